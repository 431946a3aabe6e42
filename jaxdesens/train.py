"""Training: where a step's masks come from, the jitted data-parallel step, and the resumable loop
(the state, optimiser and schedule a checkpoint holds are in `state.py`).

`train_and_evaluate(config, workdir)` is the whole job: it reads the data, splits identities
into training and held-out sets, trains with checkpoints in `workdir`, and ends with a 10-fold
verification of the held-out identities. Re-running it with the same workdir resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxdesens import parallel
from jaxdesens.config import TrainConfig
from jaxdesens.data import IdentitySet, SyntheticConfig, load_dataset, split_identities
from jaxdesens.data.pipeline import ArraySource, train_batches
from jaxdesens.masks import io as mask_io
from jaxdesens.masks import levels
from jaxdesens.masks.ops import mask_ratio
from jaxdesens.models import ResNet
from jaxdesens.recognizer import Recognizer, network_inputs
from jaxdesens.state import TrainState, build_model, create_train_state, lr_schedule
from jaxdesens.workdir import MetricsLog, RunDirectory, window_values


@flax.struct.dataclass
class MaskSource:
    """Where a step's masks come from: one fixed mask, or a bank of hole-ratio-level masks."""

    fixed: jax.Array | None = None  # (H, W) float32, 1 = visible
    bank: jax.Array | None = None  # (levels, per_level, H, W) uint8

    def sample(self, key: jax.Array, n: int) -> jax.Array | None:
        """Masks that broadcast over n images: (n, H, W, 1) from the bank, (1, H, W, 1) for a
        fixed mask (so the FSM branch runs once per step), or None for clean training."""
        if self.fixed is not None:
            return self.fixed[None, :, :, None]
        if self.bank is not None:
            return levels.level_masks(key, self.bank, n)[..., None]
        return None


def train_step(state: TrainState, batch: dict[str, jax.Array], masks: MaskSource, base_key: jax.Array,
               *, use_fsm: bool, schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a global batch; the masks of step `s` depend only on (seed, s)."""
    images = batch["image"].astype(jnp.float32) / 255.0
    labels = batch["label"]
    mask = masks.sample(jax.random.fold_in(base_key, state.step), images.shape[0])
    images, fsm_mask = network_inputs(images, mask, use_fsm)

    def loss_fn(params):
        (logits, _), updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images,
                                              fsm_mask, train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (updates["batch_stats"], logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "lr": schedule(state.step)}
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def compile_train_step(config: TrainConfig, mesh, use_fsm: bool) -> Callable:
    repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    step = functools.partial(train_step, use_fsm=use_fsm, schedule=lr_schedule(config))
    return jax.jit(step, in_shardings=(repl, sharded, repl, repl), out_shardings=(repl, repl), donate_argnums=0)


def mask_source_for(config: TrainConfig, dataset: IdentitySet, key: jax.Array) -> tuple[MaskSource, str]:
    """Chooses the masks of a mode and says in words which it chose (for the log)."""
    size = config.image_size
    if config.model == "resnet":
        return MaskSource(), "clean images"
    if config.mask is not None:
        mask = mask_io.load_mask(config.mask, size)
        return MaskSource(fixed=jnp.asarray(mask)), f"fixed mask {config.mask} (ratio {mask_ratio(mask):.3f})"
    if dataset.mask is not None:
        return MaskSource(fixed=jnp.asarray(dataset.mask)), f"the export's mask (ratio {mask_ratio(dataset.mask):.3f})"
    bank = levels.make_level_bank(key, size, size, config.level_bank_size)
    return (MaskSource(bank=jnp.asarray(bank)),
            f"random hole-ratio-level masks ({bank.shape[0]} levels x {bank.shape[1]}); no --mask given")


def mask_fingerprint(config: TrainConfig, dataset: IdentitySet) -> str | None:
    if config.mask is not None:
        return mask_io.fingerprint(mask_io.load_mask(config.mask, config.image_size))
    if dataset.mask is not None and config.model != "resnet":
        return mask_io.fingerprint(dataset.mask)
    return None


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    model: ResNet
    config: TrainConfig
    evaluation: dict[str, Any]


def load_data(config: TrainConfig, progress: bool = False) -> IdentitySet:
    synthetic = SyntheticConfig(config.synthetic_identities, config.synthetic_images_per_identity,
                                config.image_size, config.channels, seed=0)
    return load_dataset(config.data, config.image_size, config.channels, synthetic, progress=progress)


def train_and_evaluate(config: TrainConfig, workdir: str | Path, progress: bool = True,
                       log: Callable[[str], None] = print) -> TrainResult:
    """Trains (or resumes) in `workdir`, then evaluates verification on held-out identities."""
    from tqdm.auto import tqdm

    from jaxdesens.evaluation import format_evaluation, held_out_verification

    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh()
    parallel.local_batch_size(config.batch_size, mesh)
    dataset = load_data(config, progress=progress)
    train_set, held_out = split_identities(dataset, config.holdout, seed=config.split_seed)
    run = RunDirectory(workdir)
    run.claim(config, data_fingerprint=dataset.fingerprint, mask_fingerprint=mask_fingerprint(config, dataset),
              num_classes=train_set.num_classes)

    key = jax.random.key(config.seed)
    init_key, mask_key, step_key = jax.random.split(key, 3)
    model = build_model(config, train_set.num_classes)
    masks, mask_note = mask_source_for(config, dataset, mask_key)
    log(f"data: {dataset.source} -> {len(train_set)} training images of {train_set.num_classes} identities, "
        f"{held_out.num_classes} held-out identities; model {config.model} (ResNet-{config.depth}, width "
        f"{config.width}{f', FSM after layer{config.fsm_after}' if config.model == 'fsm' else ''}) on "
        f"{mesh.size} {jax.devices()[0].platform} device(s); masks: {mask_note}")

    state = create_train_state(config, model, init_key, train_set.image_shape)
    state = run.restore_or(state)
    start = int(state.step)
    if start:
        log(f"resuming from step {start} in {run.path}")
    state = parallel.put_replicated(state, mesh)
    masks = parallel.put_replicated(masks, mesh)
    step_key = parallel.put_replicated(step_key, mesh)
    step_fn = compile_train_step(config, mesh, use_fsm=config.model == "fsm")
    metrics_log = MetricsLog(run.path, start_step=start)

    # An export is masked at the source: mirroring its images would move the holes off the mask.
    flip = config.flip and dataset.mask is None
    if config.flip and not flip:
        log("flip augmentation off: the images are already masked (a desensitized export)")
    batches = train_batches(ArraySource(train_set.images, train_set.labels), config.batch_size, config.steps,
                            seed=config.seed, start_step=start, flip=flip)
    bar = tqdm(total=config.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    window_start, window_images = time.perf_counter(), 0
    pending = []
    for step in range(start, config.steps):
        state, metrics = step_fn(state, parallel.put_batch(next(batches), mesh), masks, step_key)
        pending.append(metrics)
        window_images += config.batch_size
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            values = window_values(pending, window_images, time.perf_counter() - window_start)
            metrics_log.write(done, values)
            bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2g}",
                            img_s=f"{values['images_per_s']:.0f}")
            pending, window_start, window_images = [], time.perf_counter(), 0
        bar.update(1)
        if done % config.checkpoint_every == 0 or done == config.steps:
            run.save(done, state)
    bar.close()
    run.wait()
    metrics_log.close()

    # evaluation is per process: under multi-host every process holds a full replica
    recognizer = Recognizer(model, parallel.to_host_local({"params": state.params, "batch_stats": state.batch_stats}),
                            config)
    evaluation = held_out_verification(recognizer, held_out, masks, premasked=dataset.mask is not None,
                                       batch_size=config.eval_batch_size)
    log(format_evaluation(evaluation))
    run.write_json("eval.json", evaluation)
    return TrainResult(state, model, config, evaluation)
