"""One client's round and evaluation, and the server's aggregation: pure functions both engines
run unchanged (the Flower client jits `client_update` as is; the simulation runs it for every
client inside one jitted round).

A client's state between rounds (`state.initial_local_state`) is its last model (`variables`: under
FedBN its BatchNorm layers are read from here) and its optimizer state (read under
`--client_optimizer=local`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdesens.config import TrainConfig
from jaxdesens.federation import fedbn
from jaxdesens.federation.config import FederatedConfig
from jaxdesens.recognizer import network_inputs
from jaxdesens.state import TrainState, lr_schedule, make_optimizer
from jaxdesens.train import MaskSource, train_step

EVAL_KEY_SEED = 4321  # the random level masks a client evaluates under do not depend on the round


def client_keys(step_key: jax.Array, clients: int | range | list[int]) -> jax.Array:
    """Each client's base mask key (step s of client c uses fold_in(fold_in(step_key, c), s))."""
    indices = range(clients) if isinstance(clients, int) else clients
    return jnp.stack([jax.random.fold_in(step_key, c) for c in indices])


def client_update(global_vars: dict[str, Any], local: dict[str, Any], batches: dict[str, jax.Array],
                  masks: MaskSource, base_key: jax.Array, step0: jax.Array, *, model, tx: optax.GradientTransformation,
                  schedule: optax.Schedule, use_fsm: bool, bn: str, client_optimizer: str,
                  unroll: int | bool = 1) -> tuple[dict[str, Any], dict[str, Any], dict[str, jax.Array]]:
    """One client's round: `local_steps` training steps (`lax.scan` of `train_step`) from the global model.

    `global_vars` = {"params", "batch_stats"} as downloaded (under FedBN its BatchNorm layers are
    replaced by the client's own from `local`); `batches` = {"image": (S, B, H, W, C) uint8,
    "label": (S, B)}; `step0` = the global step of the round's first local step. Returns the
    trained model (of which only the shared part is uploaded under FedBN), the client's new local
    state and the mean loss/accuracy over the local steps.
    """
    flags = fedbn.local_flags(global_vars, bn)
    start = fedbn.merge(global_vars, local["variables"], flags)
    step0 = jnp.asarray(step0, jnp.int32)
    if client_optimizer == "local":
        opt_state = local["opt_state"]
    else:  # fresh momentum, but the schedule's step count continues globally
        opt_state = optax.tree_utils.tree_set(tx.init(start["params"]), count=step0)
    state = TrainState(step=step0, apply_fn=model.apply, params=start["params"], tx=tx, opt_state=opt_state,
                       batch_stats=start["batch_stats"])

    def body(state, batch):
        return train_step(state, batch, masks, base_key, use_fsm=use_fsm, schedule=schedule)

    state, metrics = jax.lax.scan(body, state, batches, unroll=unroll)
    metrics = {"loss": metrics["loss"].mean(), "accuracy": metrics["accuracy"].mean(), "lr": metrics["lr"][-1]}
    trained = {"params": state.params, "batch_stats": state.batch_stats}
    return trained, {"variables": trained, "opt_state": state.opt_state}, metrics


def client_evaluation(global_vars: dict[str, Any], local: dict[str, Any], data: dict[str, jax.Array],
                      masks: MaskSource, *, model, use_fsm: bool, bn: str) -> dict[str, jax.Array]:
    """The global model as this client uses it (its own BatchNorm under FedBN), in inference mode
    (running statistics), on its own images under the run's masks: loss and accuracy."""
    variables = fedbn.merge(global_vars, local["variables"], fedbn.local_flags(global_vars, bn))
    images = data["image"].astype(jnp.float32) / 255.0
    mask = masks.sample(jax.random.key(EVAL_KEY_SEED), images.shape[0])
    logits, _ = model.apply(variables, *network_inputs(images, mask, use_fsm))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, data["label"])
    weight = data["weight"] / jnp.maximum(data["weight"].sum(), 1.0)
    return {"loss": jnp.sum(weight * loss), "accuracy": jnp.sum(weight * (jnp.argmax(logits, -1) == data["label"]))}


def aggregate(stacked: Any, counts: jax.Array) -> Any:
    """FedAvg: the mean over the leading client axis of every leaf, weighted by example counts."""
    counts = jnp.asarray(counts, jnp.float32)
    weights = counts / counts.sum()
    return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def server_model(aggregated: dict[str, Any], bn: str) -> dict[str, Any]:
    """The server's global model from the averaged uploads: as is, or under FedBN with the
    server's own plain BatchNorm layers in place of the (never uploaded) clients' ones."""
    flags = fedbn.local_flags(aggregated, bn)
    return fedbn.merge(aggregated, fedbn.server_batchnorm(aggregated, flags), flags)


def scan_unroll() -> int | bool:
    """How far to unroll the local-steps scan: fully on CPU, not at all elsewhere.

    XLA:CPU runs convolution gradients inside a while loop 10-25x slower than outside one
    (jax-ml/jax#12868; a ResNet-18 step here: 0.13 s plain, 1.5 s inside `lax.scan`), so on CPU
    the scan is unrolled (compile time then grows with --local_steps). GPUs and TPUs keep the loop.
    """
    return True if jax.default_backend() == "cpu" else 1


def update_kwargs(config: TrainConfig, fed: FederatedConfig, model) -> dict[str, Any]:
    train_config = fed.train_config(config)
    return dict(model=model, tx=make_optimizer(train_config), schedule=lr_schedule(train_config),
                use_fsm=config.model == "fsm", bn=fed.bn, client_optimizer=fed.client_optimizer,
                unroll=scan_unroll())


def eval_kwargs(config: TrainConfig, fed: FederatedConfig, model) -> dict[str, Any]:
    return dict(model=model, use_fsm=config.model == "fsm", bn=fed.bn)


@functools.cache
def _aggregate_jit():
    return jax.jit(aggregate)


def aggregate_host(stacked: Any, counts) -> Any:
    """`aggregate` jitted, on host-stacked client uploads (the Flower server)."""
    return _aggregate_jit()(stacked, jnp.asarray(counts, jnp.float32))
