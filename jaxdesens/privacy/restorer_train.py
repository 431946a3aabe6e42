"""Training the restoration attacker on faces of people who are NOT in the export.

The attacker's public data: by default the identities the owner held out of the export (the
same split as `launch/train.py`: `holdout`, `split_seed`), or a whole other folder with
`identities="all"`, or the synthetic faces. Masks: the mixture of `privacy/masks.py`.

Loss, on the raw prediction `p` and the composite `c = x*m + p*(1-m)`:
`hole_weight * L1(p, x) on hidden pixels + valid_weight * L1(p, x) on visible pixels
+ gradient_weight * L1(grad c, grad x)`, each averaged over all pixels (partial-convolution
paper weights 6 and 1). The gradient term compares finite differences: plain L1 settles on a
blurred median where several faces fit the visible pixels, and edges inside and at the rim of a
hole are what a recognizer reads.

Resumable like `train.py`: the batch, flips and masks of step `s` depend only on `(seed, s)`,
so a killed run resumed from its last checkpoint ends with the same parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jaxdesens.data import SyntheticConfig, load_dataset, split_identities
from jaxdesens.data.errors import DataError
from jaxdesens.masks import io as mask_io
from jaxdesens.privacy.masks import mask_bank
from jaxdesens.privacy.restorer import RestorerNet, composite
from jaxdesens.workdir import MetricsLog, RunDirectory, window_values

IDENTITIES = ("held_out", "all")


@dataclasses.dataclass(frozen=True)
class RestorerConfig:
    """Everything that decides what a restorer training computes; defaults train on a CPU in minutes."""

    data: str | None = None
    identities: str = "held_out"
    holdout: float = 0.25
    split_seed: int = 0
    mask: str | None = None
    image_size: int = 64
    channels: int = 3
    width: int = 16
    batch_size: int = 16
    steps: int = 1500
    lr: float = 2e-3
    hole_weight: float = 6.0
    valid_weight: float = 1.0
    gradient_weight: float = 1.0
    freeform_masks: int = 512
    level_masks: int = 64
    bf16: bool = False
    seed: int = 0
    synthetic_identities: int = 96
    synthetic_images_per_identity: int = 12
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 25
    # `RunDirectory.claim` lets checkpoint_every, keep_checkpoints, log_every, data and mask differ on
    # resume (TrainConfig's resumable fields, same names here); data and mask are checked by fingerprint.

    def __post_init__(self):
        if self.identities not in IDENTITIES:
            raise ValueError(f"--identities must be one of {'|'.join(IDENTITIES)}, got {self.identities!r}")
        if self.image_size % 8:
            raise ValueError(f"--image_size must be a multiple of 8 (three stride-2 stages), got {self.image_size}")
        for name in ("steps", "batch_size", "width", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.channels not in (1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {self.channels}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RestorerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# `cpu`: the defaults. `gpu`: paper-sized faces, a wider network, long training in bfloat16.
PRESETS = {"cpu": {}, "gpu": {"image_size": 112, "width": 48, "batch_size": 64, "steps": 20000, "bf16": True,
                              "freeform_masks": 2048, "level_masks": 256, "checkpoint_every": 1000, "log_every": 100}}

RESTORER_HELP = {
    "data": "identity folder of the attacker's faces; none = synthetic faces",
    "identities": "held_out: only the identities launch/train.py holds out (not in the export); all: every one",
    "holdout": "share of identities held out, as launch/train.py --holdout",
    "split_seed": "seed of the identity split, as launch/train.py --split_seed",
    "mask": "the export's mask (.png/.npy; it ships with the export), added to the training masks",
    "image_size": "side in pixels (a multiple of 8)",
    "channels": "3 (RGB) or 1 (grey)",
    "width": "channels at half resolution (w/2 at full, up to 4w at 1/8)",
    "batch_size": "images per step",
    "steps": "training steps",
    "lr": "peak Adam learning rate (cosine decay to zero)",
    "hole_weight": "weight of L1 on hidden pixels",
    "valid_weight": "weight of L1 on visible pixels",
    "gradient_weight": "weight of L1 between image gradients of the composite and the original",
    "freeform_masks": "search-style masks (visible strokes) in the training bank",
    "level_masks": "masks per hole-ratio level in the training bank",
    "bf16": "bfloat16 compute with float32 parameters",
    "seed": "seed of the initialisation, batches, flips and masks",
    "synthetic_identities": "identities of the synthetic set (without --data)",
    "synthetic_images_per_identity": "images per identity of the synthetic set (without --data)",
    "checkpoint_every": "steps between checkpoints",
    "keep_checkpoints": "checkpoints kept (the newest)",
    "log_every": "steps between metrics lines",
}


class RestorerState(train_state.TrainState):
    pass


def build_net(config: RestorerConfig) -> RestorerNet:
    return RestorerNet(width=config.width, channels=config.channels,
                       dtype=jnp.bfloat16 if config.bf16 else jnp.float32)


def create_state(config: RestorerConfig, net: RestorerNet, key: jax.Array) -> RestorerState:
    shape = (1, config.image_size, config.image_size)
    # jitted: initialising eagerly compiles every small op on its own (30 s on a CPU instead of 1 s)
    params = jax.jit(net.init)(key, jnp.zeros((*shape, config.channels)), jnp.ones((*shape, 1)))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, min(100, config.steps // 10 + 1), config.steps)
    return RestorerState.create(apply_fn=net.apply, params=params, tx=optax.adam(schedule))


def restoration_loss(predicted: jax.Array, images: jax.Array, mask: jax.Array,
                     config: RestorerConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted loss of the module docstring and its parts (each a mean over all pixels)."""
    error = jnp.abs(predicted - images)
    hole, valid = jnp.mean(error * (1 - mask)), jnp.mean(error * mask)
    restored = composite(images, mask, predicted)
    gradient = sum(jnp.mean(jnp.abs(jnp.diff(restored, axis=a) - jnp.diff(images, axis=a))) for a in (1, 2))
    loss = config.hole_weight * hole + config.valid_weight * valid + config.gradient_weight * gradient
    return loss, {"loss": loss, "hole_l1": hole / jnp.maximum(jnp.mean(1 - mask), 1e-6), "gradient_l1": gradient}


def sample_batch(key: jax.Array, images: jax.Array, bank: jax.Array, offsets: jax.Array, sizes: jax.Array,
                 batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Images (uint8 on device) drawn with replacement and flipped at random, and one mask each:
    a uniformly chosen group, then a uniform mask of that group."""
    k_index, k_flip, k_group, k_mask = jax.random.split(key, 4)
    x = images[jax.random.randint(k_index, (batch_size,), 0, images.shape[0])].astype(jnp.float32) / 255.0
    flip = jax.random.bernoulli(k_flip, 0.5, (batch_size,))[:, None, None, None]
    x = jnp.where(flip, x[:, :, ::-1], x)
    group = jax.random.randint(k_group, (batch_size,), 0, offsets.shape[0])
    within = jnp.floor(jax.random.uniform(k_mask, (batch_size,)) * sizes[group]).astype(jnp.int32)
    return x, bank[offsets[group] + within].astype(jnp.float32)[..., None]


def train_step(state: RestorerState, images: jax.Array, bank: jax.Array, offsets: jax.Array, sizes: jax.Array,
               base_key: jax.Array, *, config: RestorerConfig) -> tuple[RestorerState, dict[str, jax.Array]]:
    x, mask = sample_batch(jax.random.fold_in(base_key, state.step), images, bank, offsets, sizes, config.batch_size)

    def loss_fn(params):
        predicted = state.apply_fn({"params": params}, x, mask)
        return restoration_loss(predicted, x, mask, config)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), metrics


def compile_step(config: RestorerConfig) -> Callable:
    return jax.jit(functools.partial(train_step, config=config), donate_argnums=0)


def attacker_faces(config: RestorerConfig, progress: bool = False):
    """The attacker's training faces: an `IdentitySet` (the held-out identities by default)."""
    synthetic = SyntheticConfig(config.synthetic_identities, config.synthetic_images_per_identity,
                                config.image_size, config.channels, seed=0)
    dataset = load_dataset(config.data, config.image_size, config.channels, synthetic, progress=progress)
    if dataset.mask is not None:
        raise DataError(f"{config.data}: is a desensitized export; the restorer learns from clean faces")
    if config.identities == "held_out":
        dataset = split_identities(dataset, config.holdout, seed=config.split_seed)[1]
    return dataset


def export_mask(config: RestorerConfig) -> np.ndarray | None:
    return None if config.mask is None else mask_io.load_mask(config.mask, config.image_size)


def train_restorer(config: RestorerConfig, workdir: str | Path, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains (or resumes) the restorer in `workdir`; returns the summary also written to summary.json."""
    from tqdm.auto import tqdm

    faces = attacker_faces(config, progress=progress)
    mask = export_mask(config)
    run = RunDirectory(workdir)
    run.claim(config, data_fingerprint=faces.fingerprint,
              mask_fingerprint=None if mask is None else mask_io.fingerprint(mask), kind="restorer")
    init_key, bank_key, step_key = jax.random.split(jax.random.key(config.seed), 3)
    bank, offsets, sizes, groups = mask_bank(bank_key, config.image_size, config.freeform_masks, config.level_masks,
                                             [] if mask is None else [mask])
    log(f"restorer: {len(faces)} faces of {faces.num_classes} identities ({config.identities} of {faces.source}); "
        f"masks: " + ", ".join(f"{n} ({s})" for n, s in zip(groups, sizes)) + f"; {jax.devices()[0].platform}")
    net = build_net(config)
    state = run.restore_or(create_state(config, net, init_key))
    start = int(state.step)
    if start:
        log(f"resuming from step {start} in {run.path}")
    step_fn = compile_step(config)
    device_args = (jnp.asarray(faces.images), jnp.asarray(bank), jnp.asarray(offsets), jnp.asarray(sizes), step_key)
    metrics_log = MetricsLog(run.path, start_step=start)
    bar = tqdm(total=config.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    window_start, pending, values = time.perf_counter(), [], {}
    for step in range(start, config.steps):
        state, metrics = step_fn(state, *device_args)
        pending.append(metrics)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            values = window_values(pending, len(pending) * config.batch_size, time.perf_counter() - window_start)
            metrics_log.write(done, values)
            bar.set_postfix(loss=f"{values['loss']:.4f}", hole_l1=f"{values['hole_l1']:.3f}",
                            img_s=f"{values['images_per_s']:.0f}")
            pending, window_start = [], time.perf_counter()
        bar.update(1)
        if done % config.checkpoint_every == 0 or done == config.steps:
            run.save(done, state)
    bar.close()
    run.wait()
    metrics_log.close()
    summary = {"steps": config.steps, "faces": len(faces), "identities": faces.num_classes,
               "source": faces.source, "mask_groups": dict(zip(groups, sizes.tolist())),
               "last_metrics": values or _last_logged(run.path)}
    run.write_json("summary.json", summary)
    return summary


def _last_logged(path: Path) -> dict[str, float]:
    lines = (path / "metrics.jsonl").read_text().splitlines() if (path / "metrics.jsonl").exists() else []
    return json.loads(lines[-1]) if lines else {}


@dataclasses.dataclass(frozen=True)
class Restorer:
    """A trained restorer as a value; `restore` fills the hidden pixels of masked images."""

    net: RestorerNet
    params: Any
    config: RestorerConfig

    def restore(self, images: np.ndarray, mask: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Composited restorations (N, S, S, C) of NHWC [0, 1] images under `mask` ((H, W) or (N, H, W[, 1]))."""
        images = np.asarray(images, np.float32)
        size, channels = self.config.image_size, self.config.channels
        if images.shape[1:] != (size, size, channels):
            raise ValueError(f"the restorer was trained on {(size, size, channels)} images, got {images.shape[1:]}")
        mask = np.broadcast_to(np.asarray(mask, np.float32).reshape(-1, size, size, 1), (len(images), size, size, 1))
        fn = _restore_fn(self.net)
        out = [np.asarray(fn(self.params, images[i:i + batch_size], mask[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else images.copy()


@functools.lru_cache(maxsize=4)
def _restore_fn(net: RestorerNet):
    def restore(params, images, mask):
        return composite(images * mask, mask, net.apply({"params": params}, images * mask, mask))
    return jax.jit(restore)


def load_restorer(workdir: str | Path) -> Restorer:
    """The latest checkpoint of a restorer workdir (written by `train_restorer` / launch/restore.py)."""
    path = Path(workdir)
    record_path = path / "run.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if record.get("kind") != "restorer":
        raise DataError(f"{path}: not a restorer workdir (no run.json of kind restorer); pass the --workdir of "
                        "launch/restore.py")
    config = RestorerConfig.from_json(record["config"])
    run = RunDirectory(path)
    if run.manager.latest_step() is None:
        raise DataError(f"{path}: has no checkpoint yet; train it first")
    net = build_net(config)
    state = run.restore_or(create_state(config, net, jax.random.key(0)))
    return Restorer(net, state.params, config)
