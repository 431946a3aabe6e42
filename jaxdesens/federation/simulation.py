"""The simulation engine: K clients in one process, one jitted call per round.

Client states are stacked on a leading client axis sharded over the `clients` axis of a
("clients", "data") mesh. `clients` has gcd(K, devices) entries and `data` the rest, so every
device does K x B / devices images' work with no padding: K=2 on 4 devices is a 2x2 mesh (each
client's batch over 2 devices), K=3 on 4 devices is 1x4 (the 3 clients one after another, each
batch over all 4). Within a device group the group's clients run one after another with plain
convolutions, exactly the program a Flower client runs. (Vmapping them instead turns every
convolution into a grouped one whose batch the partitioner does not split: each device then ran
every client's full batch and XLA inserted dozens of all-gathers.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdesens.config import TrainConfig
from jaxdesens.data import IdentitySet, split_identities
from jaxdesens.federation import data as fdata
from jaxdesens.federation.client import (
    aggregate,
    client_evaluation,
    client_keys,
    eval_kwargs,
    server_model,
    update_kwargs,
)
from jaxdesens.federation.client import client_update as _client_update
from jaxdesens.federation.config import FederatedConfig
from jaxdesens.federation.protocol import head_order, read_key
from jaxdesens.federation.server import (
    RoundLog,
    ServerSetup,
    checkpoint_template,
    claim,
    finish_global,
    server_setup,
    weighted_metrics,
)
from jaxdesens.train import load_data
from jaxdesens.workdir import RunDirectory

CLIENT_AXIS = "clients"
DATA_AXIS = "data"


@dataclasses.dataclass
class Simulation:
    """The server's setup plus every client's share (labels are head rows, as on Flower)."""

    server: ServerSetup
    train_set: IdentitySet
    parts: list[np.ndarray]

    @property
    def num_classes(self) -> int:
        return self.train_set.num_classes

    def client_part(self, client: int) -> IdentitySet:
        return self.train_set.take(self.parts[client])


def prepare(config: TrainConfig, fed: FederatedConfig, federation_key: str | None = None,
            progress: bool = False) -> Simulation:
    """Data, split, parts and masks; the head's rows ordered by the clients' identity digests."""
    dataset = load_data(config, progress=progress)
    train_set, held_out = split_identities(dataset, config.holdout, seed=config.split_seed)
    server = server_setup(config, fed, dataset, held_out)
    parts = fdata.partition(train_set, fed, config.batch_size)  # on the folder's labels, as each client does
    rows = head_order(train_set.names, read_key(federation_key))
    names = [""] * len(rows)
    for name, row in zip(train_set.names, rows):
        names[row] = name
    train_set = dataclasses.replace(train_set, labels=rows[train_set.labels], names=tuple(names))
    return Simulation(server, train_set, parts)


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


def one_by_one(fn: Callable, *stacked: Any) -> Any:
    """`fn` applied to each entry of the leading axis in turn, outputs stacked: a Python loop on
    CPU (XLA:CPU runs convolution gradients inside loops much slower), `lax.map` elsewhere."""
    if jax.default_backend() != "cpu":
        return jax.lax.map(lambda args: fn(*args), stacked)
    count = jax.tree.leaves(stacked)[0].shape[0]
    outs = [fn(*jax.tree.map(lambda x, i=i: x[i], stacked)) for i in range(count)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def federated_round(global_vars, clients_local, batches, counts, masks, keys, step0, *, mesh: Mesh | None = None,
                    **update_kwargs):
    """Every client's local update (one after another within a device group) and the aggregation.

    With a `mesh`, the client axis is split over its `clients` axis by `jax.shard_map` (manual
    over `clients` only): each device group runs its own clients, and `jit` partitions each
    client's batch over `data` (BatchNorm statistics over the whole client batch).
    """
    update = functools.partial(_client_update, **update_kwargs)

    def local_updates(global_vars, clients_local, batches, masks, keys, step0):
        return one_by_one(lambda local, batch, key: update(global_vars, local, batch, masks, key, step0),
                          clients_local, batches, keys)

    if mesh is not None:
        local_updates = jax.shard_map(local_updates, mesh=mesh,
                                      in_specs=(P(), P(CLIENT_AXIS), P(CLIENT_AXIS), P(), P(CLIENT_AXIS), P()),
                                      out_specs=P(CLIENT_AXIS), axis_names=frozenset({CLIENT_AXIS}),
                                      check_vma=False)  # no collectives inside; global inputs are per-device copies
    uploaded, new_local, metrics = local_updates(global_vars, clients_local, batches, masks, keys, step0)
    return server_model(aggregate(uploaded, counts), update_kwargs["bn"]), new_local, metrics


def evaluate_clients(global_vars, clients_local, data, masks, *, mesh: Mesh | None = None, **kwargs):
    """Every client's evaluation of the global model on its own images (`client_evaluation`)."""
    evaluate = functools.partial(client_evaluation, **kwargs)

    def each(global_vars, clients_local, data, masks):
        return one_by_one(lambda local, d: evaluate(global_vars, local, d, masks), clients_local, data)

    if mesh is not None:
        each = jax.shard_map(each, mesh=mesh, in_specs=(P(), P(CLIENT_AXIS), P(CLIENT_AXIS), P()),
                             out_specs=P(CLIENT_AXIS), axis_names=frozenset({CLIENT_AXIS}), check_vma=False)
    return each(global_vars, clients_local, data, masks)


def compile_federated_round(config: TrainConfig, fed: FederatedConfig, model, mesh: Mesh) -> Callable:
    repl = NamedSharding(mesh, P())
    by_client = NamedSharding(mesh, P(CLIENT_AXIS))
    batches = NamedSharding(mesh, P(CLIENT_AXIS, None, DATA_AXIS))
    fn = functools.partial(federated_round, mesh=mesh, **update_kwargs(config, fed, model))
    # metrics stay with their client group (the host reads them): replicating them would all-gather
    return jax.jit(fn, in_shardings=(repl, by_client, batches, repl, repl, by_client, repl),
                   out_shardings=(repl, by_client, by_client), donate_argnums=(1,))


def compile_evaluate_clients(config: TrainConfig, fed: FederatedConfig, model, mesh: Mesh) -> Callable:
    repl = NamedSharding(mesh, P())
    by_client = NamedSharding(mesh, P(CLIENT_AXIS))
    data = NamedSharding(mesh, P(CLIENT_AXIS))
    fn = functools.partial(evaluate_clients, mesh=mesh, **eval_kwargs(config, fed, model))
    return jax.jit(fn, in_shardings=(repl, by_client, data, repl), out_shardings=repl)


def describe(sim: Simulation, engine: str) -> str:
    config, fed = sim.server.config, sim.server.fed
    sizes = [len(p) for p in sim.parts]
    fsm = f", FSM after layer{config.fsm_after}" if config.model == "fsm" else ""
    return (f"data: {sim.server.dataset.source} -> {len(sim.train_set)} training images of {sim.num_classes} "
            f"identities over {fed.clients} clients ({fed.split} split, images per client {sizes}), "
            f"{sim.server.held_out.num_classes} held-out identities; model {config.model} (ResNet-{config.depth}, "
            f"width {config.width}{fsm}); {fed.rounds} rounds x {fed.local_steps} local steps, bn={fed.bn}, "
            f"client optimizer={fed.client_optimizer}; engine {engine}; masks: {sim.server.mask_note}")


def run_simulation(config: TrainConfig, fed: FederatedConfig, workdir: str | Path, *, stop_after: int | None = None,
                   federation_key: str | None = None, progress: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """K simulated clients in one process; resumable per round. Returns the last round's evaluation."""
    sim = prepare(config, fed, federation_key, progress=progress)
    setup = sim.server
    model = setup.model(sim.num_classes)
    mesh = client_mesh(fed.clients, config.batch_size)
    run = RunDirectory(workdir)
    claim(run, setup, "simulation", sim.num_classes)
    log(describe(sim, "simulation") + f"; mesh {dict(mesh.shape)} of {mesh.size} "
        f"{jax.devices()[0].platform} device(s)")

    state = run.restore_or(checkpoint_template(setup, sim.num_classes, "simulation"))
    start = run.manager.latest_step() or 0
    if start:
        log(f"resuming after round {start} in {run.path}")
    repl = NamedSharding(mesh, P())
    by_client = NamedSharding(mesh, P(CLIENT_AXIS))
    global_vars = jax.device_put(state["global"], repl)
    clients_local = jax.device_put(state["clients"], by_client)
    masks = jax.device_put(setup.masks, repl)
    keys = jax.device_put(client_keys(setup.step_key, fed.clients), by_client)
    counts = np.asarray([len(p) for p in sim.parts], np.float32)
    parts = [sim.client_part(c) for c in range(fed.clients)]
    own_data = {k: np.stack([fdata.eval_set(p, fed, c, config.seed)[k] for c, p in enumerate(parts)])
                for k in ("image", "label", "weight")}
    own_data = jax.device_put(own_data, NamedSharding(mesh, P(CLIENT_AXIS)))
    round_fn = compile_federated_round(config, fed, model, mesh)
    evaluate_fn = compile_evaluate_clients(config, fed, model, mesh)
    batch_sharding = NamedSharding(mesh, P(CLIENT_AXIS, None, DATA_AXIS))
    rounds_log = RoundLog(setup, model, run.path, start, "simulation", log)
    names = [f"client {c}" for c in range(fed.clients)]

    def evaluate(round_index):
        results = jax.device_get(evaluate_fn(global_vars, clients_local, own_data, masks))
        rounds_log.record_clients(round_index, {name: {"accuracy": float(results["accuracy"][c]),
                                                       "loss": float(results["loss"][c]), "examples": int(counts[c])}
                                                for c, name in enumerate(names)})

    if start == 0:
        evaluate(0)
    last = stop_after if stop_after is not None else fed.rounds
    for r in range(start, min(last, fed.rounds)):
        began = time.perf_counter()
        per_client = [fdata.round_batches(part, config, fed, c, r) for c, part in enumerate(parts)]
        batches = jax.device_put({k: np.stack([b[k] for b in per_client]) for k in per_client[0]}, batch_sharding)
        aggregated, clients_local, metrics = round_fn(global_vars, clients_local, batches, counts, masks, keys,
                                                      np.int32(r * fed.local_steps))
        metrics = jax.device_get(metrics)
        seconds = time.perf_counter() - began
        global_vars = jax.device_put(finish_global(setup, model, aggregated), repl)
        run.save(r + 1, {"global": global_vars, "clients": clients_local})
        rounds_log.record(r + 1, global_vars, weighted_metrics(metrics, counts), seconds)
        evaluate(r + 1)
    run.wait()
    rounds_log.finish()
    return rounds_log.last
