"""What a checkpoint holds: the network a TrainConfig builds, its optimizer and schedule, and the
initial state a checkpoint is restored into.

It sits below training, federation and every checkpoint reader, so reading a trained model never
imports the code that trains one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jaxdesens.config import TrainConfig
from jaxdesens.models import ResNet


class TrainState(train_state.TrainState):
    batch_stats: Any


def build_model(config: TrainConfig, num_classes: int) -> ResNet:
    return ResNet(depth=config.depth, num_classes=num_classes, width=config.width,
                  dtype=jnp.bfloat16 if config.bf16 else jnp.float32,
                  fsm_after=config.fsm_after if config.model == "fsm" else None,
                  zero_init_residual=config.zero_init_residual)


def lr_schedule(config: TrainConfig) -> optax.Schedule:
    """The paper's schedule: `lr`, divided by 10 at 50%, 70% and 90% of the steps."""
    boundaries = {max(1, int(config.steps * f)): 0.1 for f in (0.5, 0.7, 0.9)}
    return optax.piecewise_constant_schedule(config.lr, boundaries)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """SGD with momentum 0.9 and weight decay on convolution and dense kernels only."""
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
    return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                       optax.sgd(lr_schedule(config), momentum=config.momentum))


def create_train_state(config: TrainConfig, model: ResNet, key: jax.Array, image_shape: tuple[int, ...]) -> TrainState:
    images = jnp.zeros((1, *image_shape), jnp.float32)
    mask = jnp.ones((1, *image_shape[:2], 1), jnp.float32) if model.fsm_after else None
    variables = model.init(key, images, mask, train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables["batch_stats"], tx=make_optimizer(config))


def initial_variables(config: TrainConfig, model, key: jax.Array, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """`create_train_state`'s initial params and statistics, jitted (eager init is slow on CPU)."""
    def init(key):
        state = create_train_state(config, model, key, image_shape)
        return {"params": state.params, "batch_stats": state.batch_stats}
    return jax.jit(init)(key)


def initial_local_state(global_vars: dict[str, Any], tx: optax.GradientTransformation) -> dict[str, Any]:
    """A federated client's state before its first round: the initial model (under FedBN its
    BatchNorm layers are the client's own from then on) and a fresh optimizer."""
    return {"variables": global_vars, "opt_state": tx.init(global_vars["params"])}
