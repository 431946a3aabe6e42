"""A trained recognizer as a value: model, variables and config, with its embedding function.

The embedding is the global-average-pooled last feature map (the classifier head is dropped),
compared by cosine similarity. An FSM model embeds clean images with no mask, which is
exactly the plain backbone (Situations 2 and 3 of the paper).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdesens.config import TrainConfig
from jaxdesens.data.errors import DataError
from jaxdesens.data.pipeline import eval_batches
from jaxdesens.models import ResNet


@functools.lru_cache(maxsize=16)
def _embed_fn(model: ResNet, with_mask: bool):
    def embed(variables, images, mask):
        images = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images
        if with_mask:
            images = images * mask
        _, features = model.apply(variables, images, mask if with_mask and model.fsm_after else None)
        return features["embedding"]
    return jax.jit(embed)


@dataclasses.dataclass(frozen=True)
class Recognizer:
    model: ResNet
    variables: dict[str, Any]
    config: TrainConfig

    def embed(self, images: np.ndarray, mask: np.ndarray | None = None, batch_size: int = 128,
              flip: bool = False) -> np.ndarray:
        """Embeddings `(N, D)` of uint8 (or [0, 1] float) NHWC images, optionally under a mask.

        `mask` is one `(H, W)` / `(1, H, W, 1)` mask for all images or `(N, H, W[, 1])`, one per image.
        With `flip`, the embedding of the mirrored image is added (flip-augmented embeddings).
        """
        fn = _embed_fn(self.model, mask is not None)
        height, width = images.shape[1:3]
        if mask is not None:
            mask = np.asarray(mask, np.float32).reshape(-1, height, width, 1)
            if len(mask) not in (1, len(images)):
                raise ValueError(f"{len(mask)} masks for {len(images)} images; give one mask or one per image")
            mask = np.broadcast_to(mask, (len(images), height, width, 1))
        out = []
        for start, (chunk, valid) in zip(range(0, len(images), batch_size), eval_batches(images, batch_size)):
            m = None if mask is None else next(eval_batches(mask[start:start + valid], batch_size))[0]
            emb = fn(self.variables, chunk, m)
            if flip:
                emb = emb + fn(self.variables, chunk[:, :, ::-1], None if m is None else m[:, :, ::-1])
            out.append(np.asarray(emb[:valid]))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_recognizer(workdir: str | Path) -> Recognizer:
    """Restores the latest checkpoint of a training workdir (params and BatchNorm statistics), or
    the global model of the last round of a federated one."""
    from jaxdesens.train import build_model, create_train_state
    from jaxdesens.workdir import RunDirectory

    path = Path(workdir)
    record_path = path / "run.json"
    if not record_path.exists():
        raise DataError(f"{path}: not a training workdir (no run.json); pass the --workdir of launch/train.py "
                        "or launch/federated.py")
    record = RunDirectory(path).read_record()
    if "federated" in record:
        from jaxdesens.federated import load_global

        return load_global(path)[0]
    config = TrainConfig.from_json(record["config"])
    model = build_model(config, record["num_classes"])
    run = RunDirectory(path)
    if run.manager.latest_step() is None:
        raise DataError(f"{path}: has no checkpoint yet; train it first")
    template = create_train_state(config, model, jax.random.key(0),
                                  (config.image_size, config.image_size, config.channels))
    state = run.restore_final(template, config.steps)
    return Recognizer(model, {"params": state.params, "batch_stats": state.batch_stats}, config)
