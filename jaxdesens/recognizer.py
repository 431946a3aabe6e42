"""A trained recognizer as a value (model, variables, config) with its embedding function, and
how to read one back from any workdir, plain or federated.

The embedding is the global-average-pooled last feature map (the classifier head is dropped),
compared by cosine similarity. An FSM model embeds clean images with no mask, which is
exactly the plain backbone (Situations 2 and 3 of the paper). `network_inputs` is the one
definition of what a network sees under a mask, shared by training and embedding.
This module sits below training and federation: reading a model never imports them.
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
from jaxdesens.masks.ops import apply_mask
from jaxdesens.models import ResNet
from jaxdesens.state import build_model, create_train_state, initial_local_state, initial_variables, make_optimizer


def network_inputs(images: jax.Array, mask: jax.Array | None, use_fsm: bool) -> tuple[jax.Array, jax.Array | None]:
    """What a network is given for images under `mask` (None = clean): the pixels `x * m`, and
    for an FSM model the same mask in its FSM branch."""
    if mask is None:
        return images, None
    return apply_mask(images, mask), mask if use_fsm else None


@functools.lru_cache(maxsize=16)
def _embed_fn(model: ResNet, with_mask: bool):
    def embed(variables, images, mask):
        images = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images
        _, features = model.apply(variables, *network_inputs(images, mask if with_mask else None,
                                                             model.fsm_after is not None))
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


def read_run_record(workdir: str | Path) -> dict[str, Any]:
    """The run.json of a training or federated workdir (config, classes, federated settings)."""
    path = Path(workdir) / "run.json"
    if not path.is_file():
        raise DataError(f"{workdir}: not a training workdir (no run.json); pass the --workdir of launch/train.py "
                        "or launch/federated.py")
    from jaxdesens.workdir import RunDirectory

    return RunDirectory(workdir).read_record()


def load_recognizer(workdir: str | Path) -> Recognizer:
    """Restores the latest checkpoint of a training workdir (params and BatchNorm statistics), or
    the global model of the last round of a federated one."""
    from jaxdesens.workdir import RunDirectory

    record = read_run_record(workdir)
    if "federated" in record:
        return load_global(workdir)[0]
    path = Path(workdir)
    config = TrainConfig.from_json(record["config"])
    model = build_model(config, record["num_classes"])
    run = RunDirectory(path)
    if run.manager.latest_step() is None:
        raise DataError(f"{path}: has no checkpoint yet; train it first")
    template = create_train_state(config, model, jax.random.key(0),
                                  (config.image_size, config.image_size, config.channels))
    state = run.restore_final(template, config.steps)
    return Recognizer(model, {"params": state.params, "batch_stats": state.batch_stats}, config)


def load_global(workdir: str | Path, round_index: int | None = None) -> tuple[Recognizer, int]:
    """The global model of a federated workdir after `round_index` (default: the last saved round)."""
    import orbax.checkpoint as ocp

    from jaxdesens.workdir import RunDirectory

    path = Path(workdir)
    record = read_run_record(path)
    if "federated" not in record:
        raise DataError(f"{path}: not a federated workdir (no run.json with federated settings)")
    config = TrainConfig.from_json(record["config"])
    model = build_model(config, record["num_classes"])
    image_shape = (config.image_size, config.image_size, config.channels)
    global_vars = jax.eval_shape(functools.partial(initial_variables, config, model, image_shape=image_shape),
                                 jax.random.key(0))
    template = {"global": global_vars}
    if record["engine"] == "simulation":  # the simulation also checkpoints the stacked client states
        local = jax.eval_shape(functools.partial(initial_local_state, tx=make_optimizer(config)), global_vars)
        clients = record["federated"]["clients"]
        template["clients"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct((clients, *x.shape), x.dtype), local)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), template)
    run = RunDirectory(path)
    round_index = run.manager.latest_step() if round_index is None else round_index
    if round_index is None or round_index not in run.manager.all_steps():
        raise DataError(f"{path}: no checkpoint for round {round_index} (have {sorted(run.manager.all_steps())})")
    restored = run.manager.restore(round_index, args=ocp.args.StandardRestore(template))
    return Recognizer(model, restored["global"], config), round_index
