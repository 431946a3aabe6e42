"""The federated round on a real federation: Flower (flwr >= 1.13; tested with 1.42).

One server process and N client processes talk gRPC. Each client runs the SAME jitted
single-client function as the simulation (`federated.client_update`, `lax.scan` over its local
steps) on its own part of the data, and the server runs the SAME weighted aggregation
(`federated.aggregate`); only parameters, example counts and metrics cross process boundaries.

Engine API: Flower's long-running-client API (`flwr.server.start_server` with a `Strategy`,
`flwr.client.start_client` with a `NumPyClient`, the gRPC-bidi transport). Flower marks it
deprecated since 1.13 in favour of the Deployment Engine (`flower-superlink`, `flower-supernode`,
`flwr run` of a packaged Flower App), but it is still shipped and working in 1.42, and it is the
one that fits here: the Deployment Engine starts a fresh `flwr-clientapp` process for every
message, so every client would re-import JAX, reload its data and recompile its training step in
every round, and it needs an installed app bundle and SuperExec processes. The logic below is in
plain classes (`ServerLogic`, `ClientLogic`) with thin Flower adapters, so moving to a
ServerApp/ClientApp is a change of adapters only.

Layout of one federation (see `launch/federated.py --engine=flower`):
  server  `--role=server --server_address=0.0.0.0:8080`: holds the held-out split (and the mask it
          searched), sends the global model, aggregates, checkpoints and evaluates every round.
  client  `--role=client --partition=i --server_address=HOST:8080`: loads `--data`, keeps only
          its part i and never sends images. In a real deployment each client machine points
          `--data` at its own folder (see `--partition=-1`: all of `--data` is the client's own,
          its identities are mapped onto the server's label space by name).
  `--role=all` (default) starts both on 127.0.0.1 with one command: the server in this process
  and the N clients as subprocesses.

flwr is imported only inside the functions that need it, so `jaxdesens` imports without it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdesens import federated, parallel
from jaxdesens.config import TrainConfig
from jaxdesens.data import DataError, IdentitySet
from jaxdesens.state import make_optimizer
from jaxdesens.workdir import RunDirectory

DEFAULT_SERVER_ADDRESS = "0.0.0.0:8080"
OWN_DATA = -1  # --partition=-1: the client's --data is its own folder, not a share of a common one


def _require_flwr():
    try:
        import flwr  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("--engine=flower needs Flower: pip install 'jaxdesens[federated]' (flwr>=1.13)") from err
    _quiet_flower()


def _quiet_flower(level: int = logging.WARNING) -> None:
    """Flower's own log at `level`, without the banner about the API it calls deprecated."""
    logger = logging.getLogger("flwr")
    logger.setLevel(level)
    logger.propagate = False  # Flower has its own console handler; do not print each line twice
    if not any(isinstance(f, _DropDeprecation) for f in logger.filters):
        logger.addFilter(_DropDeprecation())


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in str(record.msg)


def run_signature(config: TrainConfig, fed: federated.FederatedConfig, num_classes: int) -> str:
    """What server and clients must agree on (model, optimisation, federation), not where data lives."""
    values = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in TrainConfig.RESUMABLE_FIELDS and k not in ("synthetic_identities",
                                                                     "synthetic_images_per_identity")}
    values.update(federated=dataclasses.asdict(fed), num_classes=num_classes)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _unflatten(template: Any, arrays: list[np.ndarray]) -> Any:
    leaves, treedef = jax.tree.flatten(template)
    if len(arrays) != len(leaves):
        raise ValueError(f"received {len(arrays)} arrays for a model of {len(leaves)}; server and client run "
                         "different models")
    for got, want in zip(arrays, leaves):
        if got.shape != want.shape:
            raise ValueError(f"received an array of shape {got.shape} where the model has {want.shape}; "
                             "server and client run different models")
    return jax.tree.unflatten(treedef, [np.asarray(a, want.dtype) for a, want in zip(arrays, leaves)])


# ------------------------------------------------------------------------------------ server side


class ServerLogic:
    """Global model, weighted aggregation (`federated.aggregate`), per-round checkpoint and evaluation."""

    def __init__(self, setup: federated.Setup, workdir: str | Path, log: Callable[[str], None] = print):
        self.setup, self.log = setup, log
        self.run = RunDirectory(workdir)
        federated.claim(self.run, setup, "flower")
        state = self.run.restore_or(federated.checkpoint_template(setup, "flower"))
        self.start_round = self.run.manager.latest_step() or 0
        self.global_vars = jax.device_get(state["global"])
        self.signature = run_signature(setup.config, setup.fed, setup.train_set.num_classes)
        self.rounds_log = federated.RoundLog(setup, self.run.path, self.start_round, "flower", log)
        self.round_began = time.perf_counter()

    def fit_config(self, round_index: int) -> dict[str, Any]:
        self.round_began = time.perf_counter()
        return {"round": round_index, "signature": self.signature,
                "identities": json.dumps(list(self.setup.train_set.names))}

    def aggregate(self, round_index: int,
                  results: list[tuple[list[np.ndarray], int, dict[str, Any]]]) -> list[np.ndarray]:
        """`results`: (uploaded arrays, example count, metrics with "partition") from every client."""
        fed = self.setup.fed
        results = sorted(results, key=lambda r: int(r[2]["partition"]))
        partitions = [int(r[2]["partition"]) for r in results]
        own = [p for p in partitions if p == OWN_DATA]
        if not own and partitions != list(range(fed.clients)):
            raise RuntimeError(f"round {round_index}: results from partitions {partitions}, expected each of "
                               f"0..{fed.clients - 1} once")
        uploads = [_unflatten(self.global_vars, arrays) for arrays, _, _ in results]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *uploads)
        counts = np.asarray([n for _, n, _ in results], np.float32)
        self.global_vars = jax.device_get(federated.aggregate_host(stacked, counts))
        self.run.save(round_index, {"global": self.global_vars})
        metrics = {k: np.asarray([float(r[2][k]) for r in results]) for k in ("loss", "accuracy")}
        self.rounds_log.record(round_index, self.global_vars, federated.weighted_metrics(metrics, counts),
                               time.perf_counter() - self.round_began)
        return _flatten(self.global_vars)

    def finish(self) -> None:
        self.run.wait()
        self.rounds_log.finish()


def start_server(setup: federated.Setup, workdir: str | Path, server_address: str, *, stop_after: int | None = None,
                 log: Callable[[str], None] = print, on_ready: Callable[[], None] | None = None) -> dict | None:
    """Runs the Flower server until the last round (or `stop_after`); returns the last evaluation."""
    _require_flwr()
    import flwr
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    logic = ServerLogic(setup, workdir, log)
    fed = setup.fed
    last = min(fed.rounds, stop_after if stop_after is not None else fed.rounds)
    rounds = max(0, last - logic.start_round)
    if logic.start_round:
        log(f"resuming after round {logic.start_round} in {logic.run.path}")
    if rounds == 0:
        log(f"nothing to do: {logic.start_round} of {fed.rounds} rounds are finished in {logic.run.path}")
        logic.finish()
        return None

    class JaxFedAvg(Strategy):
        """FedAvg with every client in every round, aggregated by `federated.aggregate`."""

        def initialize_parameters(self, client_manager):
            return ndarrays_to_parameters(_flatten(logic.global_vars))

        def configure_fit(self, server_round, parameters, client_manager):
            clients = client_manager.sample(num_clients=fed.clients, min_num_clients=fed.clients)
            ins = FitIns(parameters, logic.fit_config(logic.start_round + server_round))
            return [(client, ins) for client in clients]

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"round {logic.start_round + server_round}: {len(failures)} client(s) failed: "
                                   f"{[repr(f) if isinstance(f, BaseException) else f[1].status for f in failures]}")
            arrays = logic.aggregate(logic.start_round + server_round,
                                     [(parameters_to_ndarrays(res.parameters), res.num_examples, res.metrics)
                                      for _, res in results])
            return ndarrays_to_parameters(arrays), {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None  # held-out verification runs in aggregate_fit, once per round

    log(f"Flower server on {server_address}: waiting for {fed.clients} clients, rounds "
        f"{logic.start_round + 1}..{last}")
    if on_ready is not None:
        on_ready()
    flwr.server.start_server(server_address=server_address, strategy=JaxFedAvg(),
                             config=flwr.server.ServerConfig(num_rounds=rounds))
    logic.finish()
    return logic.rounds_log.last


# ------------------------------------------------------------------------------------ client side


class ClientLogic:
    """One client: its own images, the jitted `federated.client_update`, its local state."""

    def __init__(self, config: TrainConfig, fed: federated.FederatedConfig, partition: int,
                 workdir: str | Path | None, log: Callable[[str], None] = print):
        self.config, self.fed, self.partition, self.log = config, fed, partition, log
        self.name = f"client {partition}" if partition != OWN_DATA else "client (own data)"
        self.workdir = Path(workdir) if workdir is not None else None
        self.setup: federated.Setup | None = None
        self.part: IdentitySet | None = None
        self.local: dict[str, Any] | None = None
        self.local_round: int | None = None
        if partition != OWN_DATA:
            if not 0 <= partition < fed.clients:
                raise ValueError(f"--partition={partition} must be in 0..{fed.clients - 1} (or -1 for own data)")
            self._build(federated.prepare(config, fed))

    def _build(self, setup: federated.Setup, part: IdentitySet | None = None) -> None:
        self.setup = setup
        self.part = part if part is not None else setup.client_part(self.partition)
        config = self.config
        self.mesh = parallel.make_mesh()
        parallel.local_batch_size(config.batch_size, self.mesh)
        self.update = federated.compile_client_update(config, self.fed, setup.model, self.mesh)
        self.masks = parallel.put_replicated(setup.masks, self.mesh)
        # a client's seeds: its partition, or (own data) a number derived from its data
        self.index = (self.partition if self.partition != OWN_DATA
                      else int(hashlib.sha256(setup.dataset.fingerprint.encode()).hexdigest()[:7], 16))
        self.key = federated.client_keys(setup.step_key, [self.index])[0]
        self.tx = make_optimizer(self.fed.train_config(config))
        self.template = jax.eval_shape(setup.initial_global)
        self.signature = run_signature(config, self.fed, setup.train_set.num_classes)
        self.store = None
        if self.workdir is not None:
            self.store = RunDirectory(self.workdir)
            self.store.claim(self.fed.train_config(config), data_fingerprint=setup.dataset.fingerprint,
                             federated=dataclasses.asdict(self.fed), engine="flower-client", partition=self.partition,
                             signature=self.signature)
        self.log(f"{self.name}: {len(self.part)} images of "
                 f"{len(np.unique(self.part.labels))} identities; masks: {setup.mask_note}")

    def _own_data(self, identities: list[str]) -> None:
        """--partition=-1: all of --data is this client's; its identity folders are mapped by name
        onto the server's training label space (folders the server does not train on are skipped)."""
        from jaxdesens.state import build_model
        from jaxdesens.train import load_data, mask_source_for

        dataset = load_data(self.config)
        index = {name: i for i, name in enumerate(identities)}
        mapped = np.asarray([index.get(dataset.names[label], -1) for label in dataset.labels])
        keep = mapped >= 0
        if keep.sum() < self.config.batch_size:
            raise DataError(f"{dataset.source}: {int(keep.sum())} images belong to identities the server trains on "
                            f"(fewer than --batch_size={self.config.batch_size}); identity folder names must match "
                            "the server's")
        train_set = dataclasses.replace(dataset, images=dataset.images[keep], labels=mapped[keep].astype(np.int32),
                                        names=tuple(identities))
        init_key, mask_key, step_key = jax.random.split(jax.random.key(self.config.seed), 3)
        masks, note = mask_source_for(self.config, dataset, mask_key)
        model = build_model(self.config, len(identities))
        setup = federated.Setup(self.config, self.fed, dataset, train_set, train_set, [np.arange(len(train_set))],
                                model, masks, note, init_key, step_key)
        self._build(setup, part=train_set)

    def _local_state(self, global_vars: dict[str, Any], round_index: int) -> dict[str, Any]:
        if not self.fed.stateful_clients() or round_index == 1:
            return federated.initial_local_state(global_vars, self.tx)
        if self.local is not None and self.local_round == round_index - 1:
            return self.local
        if self.store is not None and (round_index - 1) in self.store.manager.all_steps():
            import orbax.checkpoint as ocp

            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                    jax.eval_shape(functools.partial(federated.initial_local_state, tx=self.tx),
                                                   global_vars))
            self.log(f"{self.name}: restoring its local state of round {round_index - 1}")
            return self.store.manager.restore(round_index - 1, args=ocp.args.StandardRestore(template))
        self.log(f"{self.name}: WARNING no local state of round {round_index - 1} (bn={self.fed.bn}, "
                 f"client_optimizer={self.fed.client_optimizer}); starting from the global model")
        return federated.initial_local_state(global_vars, self.tx)

    def fit(self, arrays: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        round_index = int(config["round"])
        if self.setup is None:
            self._own_data(json.loads(str(config["identities"])))
        if config.get("signature") != self.signature:
            raise ValueError(f"{self.name}: the server runs a different configuration (signature "
                             f"{config.get('signature')} != {self.signature}); start every process with the same "
                             "model, training and federated flags")
        began = time.perf_counter()
        global_vars = _unflatten(self.template, arrays)
        local = self._local_state(global_vars, round_index)
        batches = federated.round_batches(self.part, self.config, self.fed, self.index, round_index - 1)
        batches = jax.device_put(batches, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(
            None, self.mesh.axis_names[0])))
        uploaded, local, metrics = self.update(global_vars, local, batches, self.masks, self.key,
                                               np.int32((round_index - 1) * self.fed.local_steps))
        uploaded, metrics = jax.device_get((uploaded, metrics))
        self.local, self.local_round = local, round_index
        if self.store is not None and self.fed.stateful_clients():
            self.store.save(round_index, local)
            self.store.wait()
        self.log(f"{self.name}: round {round_index} loss {float(metrics['loss']):.4f} "
                 f"({time.perf_counter() - began:.1f} s)")
        return (_flatten(uploaded), len(self.part),
                {"partition": self.partition, "loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"])})


def start_client(config: TrainConfig, fed: federated.FederatedConfig, partition: int, server_address: str,
                 workdir: str | Path | None, *, connect_timeout: float = 600.0,
                 log: Callable[[str], None] = print) -> None:
    """Runs one Flower client until the server ends the federation."""
    _require_flwr()
    _quiet_flower(logging.INFO)
    from flwr.client import NumPyClient
    from flwr.client import start_client as flwr_start_client

    logic = ClientLogic(config, fed, partition, workdir, log)

    class JaxClient(NumPyClient):
        def get_parameters(self, config):
            raise RuntimeError("the server initialises the global model; it never asks a client for one")

        def fit(self, parameters, config):
            return logic.fit(parameters, config)

    log(f"client {partition}: connecting to {server_address}")
    flwr_start_client(server_address=server_address, client=JaxClient().to_client(), insecure=True,
                      max_wait_time=connect_timeout)


# ------------------------------------------------------------------------- one command, loopback


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_federation(config: TrainConfig, fed: federated.FederatedConfig, workdir: str | Path,
                         client_command: Callable[[int, str, Path], list[str]], *, stop_after: int | None = None,
                         log: Callable[[str], None] = print) -> dict | None:
    """The server in this process and `fed.clients` client processes on 127.0.0.1, one command.

    `client_command(i, address, client_workdir)` is the argv of client i. Client output goes to
    `workdir/client_<i>.log`. If a client process dies, the federation stops with its log's tail.
    """
    setup = federated.prepare(config, fed)
    log(setup.describe(f"flower (one server + {fed.clients} client processes on 127.0.0.1)"))
    workdir = Path(workdir).resolve()
    address = f"127.0.0.1:{free_loopback_port()}"
    processes: list[subprocess.Popen] = []
    logs: list[Path] = []
    stop = threading.Event()

    def spawn() -> None:
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # N+1 processes may share one accelerator
        for i in range(fed.clients):
            path = workdir / f"client_{i}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            logs.append(path)
            with open(path, "w") as out:
                processes.append(subprocess.Popen(client_command(i, address, workdir / f"client_{i}"), stdout=out,
                                                  stderr=subprocess.STDOUT, env=env))
        threading.Thread(target=watch, daemon=True).start()

    def watch() -> None:
        while not stop.is_set():
            for i, process in enumerate(processes):
                code = process.poll()
                if code not in (None, 0):
                    tail = "".join(logs[i].read_text(errors="replace").splitlines(keepends=True)[-30:])
                    print(f"error: Flower client {i} exited with status {code}; the end of {logs[i]}:\n{tail}",
                          file=sys.stderr, flush=True)
                    terminate()
                    os._exit(1)  # the server thread is blocked waiting for this client
            time.sleep(0.5)

    def terminate() -> None:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()

    try:
        result = start_server(setup, workdir, address, stop_after=stop_after, log=log, on_ready=spawn)
        stop.set()
        for i, process in enumerate(processes):
            try:
                code = process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                code = "killed after the federation ended"
            if code != 0:
                log(f"warning: Flower client {i} ended with status {code} (log: {logs[i]})")
        return result
    except BaseException:
        stop.set()
        terminate()
        raise
