"""Federated training on desensitized data (Section 3.4; "Federated learning settings" of 4.1).

The paper's flow: the server searches a mask on data it may see (`launch/search.py`); clients
download it, desensitize their own images locally (`x * m`), train the FSM model on them, upload
parameters; the server averages them and sends the global model back; repeat for R rounds.

This module holds the pieces both engines share, plus the single-process simulation:

* `partition` splits the *training* identities' images over K clients, IID over images or
  identity-disjoint (`--split=iid|identity`). The label space stays the whole training split's
  (one shared classifier head), so every client's labels index the same head.
* `client_update` is one client's round: `lax.scan` of the training issue's `train_step` over
  `local_steps` batches, starting from the global model. It is pure; the Flower client jits it
  as is, the simulation `jax.vmap`s it over a leading client axis.
* `aggregate` is the server step: the mean over the client axis weighted by example counts.
* `run_simulation` runs all clients in ONE jitted call per round (`federated_round`): client
  states are stacked on a leading client axis that is sharded over the `clients` axis of a 2-D
  device mesh `("clients", "data")`; within a client group the batch is split over `data`.

Design choices (also in the README):

* Mesh: `clients` has `gcd(K, devices)` entries and `data` the rest, so every device is used
  with no padding: K=2 on 4 devices is a 2x2 mesh (each client's batch over 2 devices), K=3 on
  4 devices is 1x4 (the 3 clients vmapped on every device, each batch over 4). The batch must
  split over `data`. The client axis is split by `jax.shard_map` (manual over `clients` only,
  `data` left to the partitioner); see `federated_round` for why.
* Floats: the simulation and Flower compute the same function, not the same bits. Several
  clients vmapped on one device run per-client-weight (grouped) convolutions that round
  differently from one client's plain convolutions, and masked images have exact ties (max-pool
  windows and ReLU inputs of a hidden area) whose subgradient choice can flip on such a rounding
  difference. With one client per device group the engines agree to ~1e-5 over rounds; with
  several clients per device a round's model agrees at first and may drift in later rounds.
* BatchNorm: `--bn=average` averages running statistics like parameters; `--bn=local` (FedBN
  style) keeps each client's running statistics on the client (their scale and bias are still
  averaged). The server's global model then carries the example-weighted mean of the clients'
  statistics, used only for its held-out evaluation; clients never receive it.
* Optimizer: `--client_optimizer=reset` (default) starts every round with zero momentum, so a
  client is stateless between rounds (plain FedAvg); `local` keeps each client's momentum across
  rounds. Either way the step counter is global: client steps of round r are
  `r * local_steps + i`, so the paper's learning-rate schedule spans `rounds * local_steps`
  steps and step s's masks come from `fold_in(fold_in(step_key, client), s)`, as in training.
* Checkpoints: one per round (the global model and the stacked client states) via RunDirectory;
  rerunning resumes after the last finished round; config, data and mask fingerprints and the
  federated settings must match, as in `train.py`. On Flower the server checkpoints the global
  model and each stateful client its own state in its own `--workdir`.
* CPU: the local-steps scan is unrolled on CPU (`scan_unroll`), where XLA runs convolution
  gradients inside loops an order of magnitude slower.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdesens.config import TrainConfig
from jaxdesens.data import DataError, IdentitySet, split_identities
from jaxdesens.recognizer import Recognizer
from jaxdesens.state import TrainState, build_model, initial_local_state, initial_variables, lr_schedule, make_optimizer
from jaxdesens.train import MaskSource, load_data, mask_fingerprint, mask_source_for, train_step
from jaxdesens.workdir import RunDirectory, write_json_atomic

CLIENT_AXIS = "clients"
DATA_AXIS = "data"
SPLITS = ("iid", "identity")
BN_MODES = ("average", "local")
OPTIMIZER_MODES = ("reset", "local")
ENGINES = ("simulation", "flower")


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
    """The federated settings that change what is computed (stored in run.json, checked on resume)."""

    clients: int = 3
    rounds: int = 5
    local_steps: int = 10
    split: str = "iid"
    bn: str = "average"
    client_optimizer: str = "reset"
    partition_seed: int = 0

    def __post_init__(self):
        for name in ("clients", "rounds", "local_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name, allowed in (("split", SPLITS), ("bn", BN_MODES), ("client_optimizer", OPTIMIZER_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {'|'.join(allowed)}, got {getattr(self, name)!r}")

    @property
    def total_steps(self) -> int:
        return self.rounds * self.local_steps

    def stateful_clients(self) -> bool:
        """Whether clients carry state between rounds (local BN statistics or local momentum)."""
        return self.bn == "local" or self.client_optimizer == "local"

    def train_config(self, config: TrainConfig) -> TrainConfig:
        """The training config a client step uses: its schedule spans all rounds' local steps."""
        return dataclasses.replace(config, steps=self.total_steps)


# ----------------------------------------------------------------------------------------- data


def partition(train_set: IdentitySet, fed: FederatedConfig, batch_size: int) -> list[np.ndarray]:
    """Image indices of each client's part of the training split (sorted, disjoint, covering it).

    `iid`: a seeded shuffle of all training images cut into K near-equal parts. `identity`: a
    seeded shuffle of the training identities cut into K groups; a client holds all images of
    its identities, and no identity is on two clients. Each part must fill one batch.
    """
    rng = np.random.default_rng(fed.partition_seed)
    if fed.split == "iid":
        parts = np.array_split(rng.permutation(len(train_set)), fed.clients)
    else:
        if fed.clients > train_set.num_classes:
            raise DataError(f"{train_set.source}: --split=identity needs at least one identity per client; "
                            f"{train_set.num_classes} training identities for --clients={fed.clients}")
        groups = np.array_split(rng.permutation(train_set.num_classes), fed.clients)
        parts = [np.flatnonzero(np.isin(train_set.labels, group)) for group in groups]
    parts = [np.sort(p) for p in parts]
    small = [(i, len(p)) for i, p in enumerate(parts) if len(p) < batch_size]
    if small:
        raise DataError(f"{train_set.source}: client parts {small} (client, images) hold fewer images than "
                        f"--batch_size={batch_size}; use fewer --clients or a smaller --batch_size")
    return parts


def client_seed(seed: int, client: int) -> int:
    """The shuffling/augmentation seed of one client's pipeline (independent across clients)."""
    return int(np.random.SeedSequence([seed, client]).generate_state(1)[0] & 0x7FFFFFFF)


def round_batches(part: IdentitySet, config: TrainConfig, fed: FederatedConfig, client: int,
                  round_index: int) -> dict[str, np.ndarray]:
    """Client `client`'s host batches `(local_steps, B, ...)` for round `round_index` (0-based).

    The training pipeline addressed by global step (steps `round_index * local_steps` on), with
    the client's own seed: the same batches in simulation, on Flower and after a resume.
    """
    from jaxdesens.data.pipeline import ArraySource, train_batches

    first = round_index * fed.local_steps
    batches = list(train_batches(ArraySource(part.images, part.labels), config.batch_size, first + fed.local_steps,
                                 seed=client_seed(config.seed, client), start_step=first, flip=config.flip,
                                 threads=1))
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


# ------------------------------------------------------------------------------- client / server


def client_keys(step_key: jax.Array, clients: int | range | list[int]) -> jax.Array:
    """Each client's base mask key (step s of client c uses fold_in(fold_in(step_key, c), s))."""
    indices = range(clients) if isinstance(clients, int) else clients
    return jnp.stack([jax.random.fold_in(step_key, c) for c in indices])


def client_update(global_vars: dict[str, Any], local: dict[str, Any], batches: dict[str, jax.Array],
                  masks: MaskSource, base_key: jax.Array, step0: jax.Array, *, model, tx: optax.GradientTransformation,
                  schedule: optax.Schedule, use_fsm: bool, bn: str, client_optimizer: str,
                  unroll: int | bool = 1) -> tuple[dict[str, Any], dict[str, Any], dict[str, jax.Array]]:
    """One client's round: `local_steps` training steps (`lax.scan` of `train_step`) from the global model.

    `global_vars` = {"params", "batch_stats"} as downloaded; `local` = {"batch_stats", "opt_state"}
    kept by the client; `batches` = {"image": (S, B, H, W, C) uint8, "label": (S, B)}; `step0` =
    the global step of the round's first local step. Returns the model to upload, the client's
    new local state and the mean loss/accuracy over the local steps.
    """
    params = global_vars["params"]
    batch_stats = local["batch_stats"] if bn == "local" else global_vars["batch_stats"]
    step0 = jnp.asarray(step0, jnp.int32)
    if client_optimizer == "local":
        opt_state = local["opt_state"]
    else:  # fresh momentum, but the schedule's step count continues globally
        opt_state = optax.tree_utils.tree_set(tx.init(params), count=step0)
    state = TrainState(step=step0, apply_fn=model.apply, params=params, tx=tx, opt_state=opt_state,
                       batch_stats=batch_stats)

    def body(state, batch):
        return train_step(state, batch, masks, base_key, use_fsm=use_fsm, schedule=schedule)

    state, metrics = jax.lax.scan(body, state, batches, unroll=unroll)
    metrics = {"loss": metrics["loss"].mean(), "accuracy": metrics["accuracy"].mean(), "lr": metrics["lr"][-1]}
    return ({"params": state.params, "batch_stats": state.batch_stats},
            {"batch_stats": state.batch_stats, "opt_state": state.opt_state}, metrics)


def aggregate(stacked: Any, counts: jax.Array) -> Any:
    """FedAvg: the mean over the leading client axis of every leaf, weighted by example counts."""
    counts = jnp.asarray(counts, jnp.float32)
    weights = counts / counts.sum()
    return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def federated_round(global_vars, clients_local, batches, counts, masks, keys, step0, *, mesh: Mesh | None = None,
                    **update_kwargs):
    """All clients' local updates (vmapped over the client axis) and the server's aggregation.

    With a `mesh`, the client axis is split over its `clients` axis by `jax.shard_map` (manual
    over `clients` only): each device group vmaps its own clients, and `jit` still partitions each
    client's batch over `data` automatically (BatchNorm statistics over the whole client batch).
    Letting the partitioner split the vmapped client axis itself is not safe: on XLA:CPU the
    per-client-weight convolution of the FSM's 1-channel mask input gets wrong kernel gradients
    (and a 2-D mesh aborts with heap corruption) once that axis is sharded.
    """
    local_updates = jax.vmap(functools.partial(client_update, **update_kwargs), in_axes=(None, 0, 0, None, 0, None))
    if mesh is not None:
        local_updates = jax.shard_map(local_updates, mesh=mesh,
                                      in_specs=(P(), P(CLIENT_AXIS), P(CLIENT_AXIS), P(), P(CLIENT_AXIS), P()),
                                      out_specs=P(CLIENT_AXIS), axis_names=frozenset({CLIENT_AXIS}),
                                      check_vma=False)  # no collectives inside; global inputs are per-device copies
    uploaded, new_local, metrics = local_updates(global_vars, clients_local, batches, masks, keys, step0)
    return aggregate(uploaded, counts), new_local, metrics


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


def compile_client_update(config: TrainConfig, fed: FederatedConfig, model, mesh: Mesh | None = None) -> Callable:
    """The jitted single-client update (the Flower client's training); data-parallel over `mesh`."""
    fn = functools.partial(client_update, **update_kwargs(config, fed, model))
    if mesh is None:
        return jax.jit(fn)
    repl = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P(None, mesh.axis_names[0]))
    return jax.jit(fn, in_shardings=(repl, repl, batch, repl, repl, repl), out_shardings=repl)


@functools.cache
def _aggregate_jit():
    return jax.jit(aggregate)


def aggregate_host(stacked: Any, counts: np.ndarray) -> Any:
    """`aggregate` jitted, on host-stacked client uploads (the Flower server)."""
    return _aggregate_jit()(stacked, np.asarray(counts, np.float32))


def client_mesh(num_clients: int, batch_size: int, devices: list | None = None) -> Mesh:
    """A ("clients", "data") mesh over all devices: gcd(K, devices) client groups, the rest data."""
    devices = list(devices if devices is not None else jax.devices())
    groups = math.gcd(num_clients, len(devices))
    per_client = len(devices) // groups
    if batch_size % per_client:
        raise ValueError(f"--batch_size={batch_size} must be a multiple of {per_client}: {len(devices)} devices "
                         f"form {groups} client group(s) for --clients={num_clients}, so each client's batch is "
                         f"split over {per_client} devices")
    return Mesh(np.asarray(devices).reshape(groups, per_client), (CLIENT_AXIS, DATA_AXIS))


def compile_federated_round(config: TrainConfig, fed: FederatedConfig, model, mesh: Mesh) -> Callable:
    repl = NamedSharding(mesh, P())
    by_client = NamedSharding(mesh, P(CLIENT_AXIS))
    batches = NamedSharding(mesh, P(CLIENT_AXIS, None, DATA_AXIS))
    fn = functools.partial(federated_round, mesh=mesh, **update_kwargs(config, fed, model))
    return jax.jit(fn, in_shardings=(repl, by_client, batches, repl, repl, by_client, repl),
                   out_shardings=(repl, by_client, repl), donate_argnums=(1,))


# ------------------------------------------------------------------------------------ run setup


@dataclasses.dataclass
class Setup:
    """What both engines derive identically from (config, fed): data, parts, model, masks, keys."""

    config: TrainConfig
    fed: FederatedConfig
    dataset: IdentitySet
    train_set: IdentitySet
    held_out: IdentitySet
    parts: list[np.ndarray]
    model: Any
    masks: MaskSource
    mask_note: str
    init_key: jax.Array
    step_key: jax.Array

    def client_part(self, client: int) -> IdentitySet:
        return self.train_set.take(self.parts[client])

    def initial_global(self) -> dict[str, Any]:
        return initial_variables(self.fed.train_config(self.config), self.model, self.init_key,
                                 self.train_set.image_shape)

    def describe(self, engine: str) -> str:
        sizes = [len(p) for p in self.parts]
        fsm = f", FSM after layer{self.config.fsm_after}" if self.config.model == "fsm" else ""
        return (f"data: {self.dataset.source} -> {len(self.train_set)} training images of "
                f"{self.train_set.num_classes} identities over {self.fed.clients} clients ({self.fed.split} split, "
                f"images per client {sizes}), {self.held_out.num_classes} held-out identities; "
                f"model {self.config.model} (ResNet-{self.config.depth}, width {self.config.width}{fsm}); "
                f"{self.fed.rounds} rounds x {self.fed.local_steps} local steps, bn={self.fed.bn}, "
                f"client optimizer={self.fed.client_optimizer}; engine {engine}; masks: {self.mask_note}")


def prepare(config: TrainConfig, fed: FederatedConfig, progress: bool = False) -> Setup:
    dataset = load_data(config, progress=progress)
    train_set, held_out = split_identities(dataset, config.holdout, seed=config.split_seed)
    parts = partition(train_set, fed, config.batch_size)
    init_key, mask_key, step_key = jax.random.split(jax.random.key(config.seed), 3)
    model = build_model(config, train_set.num_classes)
    masks, note = mask_source_for(config, dataset, mask_key)
    return Setup(config, fed, dataset, train_set, held_out, parts, model, masks, note, init_key, step_key)


def claim(run: RunDirectory, setup: Setup, engine: str) -> None:
    """Records the run in run.json, or refuses a workdir that holds a different one."""
    run.claim(setup.fed.train_config(setup.config), data_fingerprint=setup.dataset.fingerprint,
              mask_fingerprint=mask_fingerprint(setup.config, setup.dataset), num_classes=setup.train_set.num_classes,
              federated=dataclasses.asdict(setup.fed), engine=engine)


def checkpoint_template(setup: Setup, engine: str) -> dict[str, Any]:
    """The per-round checkpoint: the global model, plus the stacked client states in simulation."""
    global_vars = setup.initial_global()
    template = {"global": global_vars}
    if engine == "simulation":
        tx = make_optimizer(setup.fed.train_config(setup.config))
        local = jax.jit(initial_local_state, static_argnums=1)(global_vars, tx)
        template["clients"] = jax.tree.map(lambda x: jnp.broadcast_to(x, (setup.fed.clients, *x.shape)), local)
    # on one device: a checkpoint saved on another device count restores here, then goes to the mesh
    return jax.device_put(template, jax.devices()[0])


# ------------------------------------------------------------------------------- per-round record


class RoundLog:
    """Held-out verification of the global model after every round: printed and in rounds.jsonl.

    On resume, lines after the restored round are dropped (they will be recomputed).
    """

    def __init__(self, setup: Setup, workdir: Path, start_round: int, engine: str,
                 log: Callable[[str], None] = print):
        self.setup, self.engine, self.log = setup, engine, log
        self.path = workdir / "rounds.jsonl"
        self.workdir = workdir
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["round"] <= start_round]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.last: dict[str, Any] | None = None

    def record(self, round_index: int, global_vars: dict[str, Any], train: dict[str, float],
               train_seconds: float) -> dict[str, Any]:
        from jaxdesens.evaluation import held_out_verification

        start = time.perf_counter()
        recognizer = Recognizer(self.setup.model, global_vars, self.setup.config)
        evaluation = held_out_verification(recognizer, self.setup.held_out, self.setup.masks,
                                           batch_size=self.setup.config.eval_batch_size)
        entry = {"round": round_index, "step": round_index * self.setup.fed.local_steps, "engine": self.engine,
                 **{f"train_{k}": float(v) for k, v in train.items()},
                 "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - start}
        for name in ("clean", "masked"):
            if name in evaluation:
                entry[name] = {k: float(evaluation[name][k]) for k in ("accuracy", "accuracy_std", "auc")}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        text = "  ".join(f"{name} accuracy {entry[name]['accuracy']:.4f} +- {entry[name]['accuracy_std']:.4f} "
                         f"(AUC {entry[name]['auc']:.4f})" for name in ("clean", "masked") if name in entry)
        self.log(f"round {round_index}/{self.setup.fed.rounds}: held-out {text}; train loss "
                 f"{entry.get('train_loss', float('nan')):.4f}; {train_seconds:.1f} s training, "
                 f"{entry['eval_seconds']:.1f} s evaluation")
        self.last = {**evaluation, "round": round_index}
        return entry

    def finish(self) -> None:
        if self.last is not None:
            write_json_atomic(self.workdir / "eval.json", self.last)


def weighted_metrics(metrics: dict[str, np.ndarray], counts: np.ndarray) -> dict[str, float]:
    """Client metrics `(K,)` averaged with the aggregation's weights."""
    weights = np.asarray(counts, np.float64) / np.sum(counts)
    return {k: float(np.dot(weights, np.asarray(v, np.float64))) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------ simulation


def run_simulation(config: TrainConfig, fed: FederatedConfig, workdir: str | Path, *, stop_after: int | None = None,
                   progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """K simulated clients in one process; resumable per round. Returns the last round's evaluation."""
    setup = prepare(config, fed, progress=progress)
    mesh = client_mesh(fed.clients, config.batch_size)
    run = RunDirectory(workdir)
    claim(run, setup, "simulation")
    log(setup.describe("simulation") + f"; mesh {dict(mesh.shape)} of {mesh.size} "
        f"{jax.devices()[0].platform} device(s)")

    state = run.restore_or(checkpoint_template(setup, "simulation"))
    start = run.manager.latest_step() or 0
    if start:
        log(f"resuming after round {start} in {run.path}")
    repl = NamedSharding(mesh, P())
    by_client = NamedSharding(mesh, P(CLIENT_AXIS))
    global_vars = jax.device_put(state["global"], repl)
    clients_local = jax.device_put(state["clients"], by_client)
    masks = jax.device_put(setup.masks, repl)
    keys = jax.device_put(client_keys(setup.step_key, fed.clients), by_client)
    counts = jax.device_put(np.asarray([len(p) for p in setup.parts], np.float32), repl)
    parts = [setup.client_part(c) for c in range(fed.clients)]
    round_fn = compile_federated_round(config, fed, setup.model, mesh)
    batch_sharding = NamedSharding(mesh, P(CLIENT_AXIS, None, DATA_AXIS))
    rounds_log = RoundLog(setup, run.path, start, "simulation", log)
    last = stop_after if stop_after is not None else fed.rounds
    for r in range(start, min(last, fed.rounds)):
        began = time.perf_counter()
        per_client = [round_batches(part, config, fed, c, r) for c, part in enumerate(parts)]
        batches = jax.device_put({k: np.stack([b[k] for b in per_client]) for k in per_client[0]}, batch_sharding)
        global_vars, clients_local, metrics = round_fn(global_vars, clients_local, batches, counts, masks, keys,
                                                       np.int32(r * fed.local_steps))
        metrics = jax.device_get(metrics)
        seconds = time.perf_counter() - began
        run.save(r + 1, {"global": global_vars, "clients": clients_local})
        rounds_log.record(r + 1, global_vars, weighted_metrics(metrics, np.asarray(jax.device_get(counts))), seconds)
    run.wait()
    rounds_log.finish()
    return rounds_log.last
