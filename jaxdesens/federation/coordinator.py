"""The server's loop on a real federation, independent of the engine that carries its messages.

A `Transport` lists the connected clients and exchanges one message with each of them, waiting
at most a given time. Flower's Grid is one (`flower_server.py`); the tests use an in-process one.

Per run: wait for the clients; register them (each names its identities by keyed digest, see
`protocol.py`; the head's label table is fixed at the first round and kept in `labels.json`);
then per round send the shared part of the global model, the masks and the client's label rows,
aggregate the replies, checkpoint, evaluate. A client that fails (it refused, raised, stopped
answering, or its node vanished) is named with the reason; the round proceeds when at least
`min_clients` answered, else the run ends with a `FederationError` listing every failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from jaxdesens.federation import fedbn
from jaxdesens.federation import protocol as proto
from jaxdesens.federation.client import aggregate_host
from jaxdesens.federation.config import ServerOptions
from jaxdesens.federation.server import (
    RoundLog,
    ServerSetup,
    checkpoint_template,
    claim,
    finish_global,
    weighted_metrics,
)
from jaxdesens.workdir import RunDirectory, write_json_atomic


class FederationError(RuntimeError):
    """The run cannot continue: too few clients answered (the message names each and why)."""


class Transport(Protocol):
    def nodes(self) -> list[int]: ...

    def exchange(self, kind: str, payloads: dict[int, proto.Payload], timeout: float) -> dict[int, proto.Reply]: ...


@dataclasses.dataclass
class Participant:
    """A registered client as the server knows it (no names of its identities: digests)."""

    node: int
    name: str
    partition: int
    digests: list[str]
    examples: int

    def label(self) -> str:
        return f"{self.name} (node {self.node})"


def reply_failure(reply: proto.Reply | None) -> str | None:
    """Why a client's reply carries no payload (None when it does)."""
    if reply is None:
        return "no reply"
    return None if reply.payload is not None else proto.error_text(reply.error)


class Coordinator:
    def __init__(self, setup: ServerSetup, workdir: str | Path, options: ServerOptions, transport: Transport, *,
                 stop_after: int | None = None, log: Callable[[str], None] = print):
        self.setup, self.options, self.transport, self.log = setup, options, transport, log
        self.required = options.required(setup.fed)
        self.run_dir = RunDirectory(workdir)
        self.stop_after = stop_after
        self.run_text = proto.encode_run(setup.config, setup.fed)
        self.masks = proto.mask_arrays(setup.masks.fixed, setup.masks.bank)
        self.masks_digest = proto.masks_digest(self.masks)
        self.participants: dict[int, Participant] = {}
        self.failed: dict[int, str] = {}  # node -> why it is out (reported once per round)

    # ----------------------------------------------------------------------------- clients

    def wait_for_clients(self) -> list[int]:
        fed, deadline = self.setup.fed, time.monotonic() + self.options.connect_timeout
        nodes = self.transport.nodes()
        while len(nodes) < fed.clients and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = self.transport.nodes()
        if len(nodes) < self.required:
            raise FederationError(f"only {len(nodes)} of {fed.clients} clients connected within "
                                  f"{self.options.connect_timeout:.0f} s (--connect_timeout); the run needs "
                                  f"{self.required} (--min_clients)")
        if len(nodes) < fed.clients:
            self.log(f"{len(nodes)} of {fed.clients} clients connected within {self.options.connect_timeout:.0f} s; "
                     f"starting with them (--min_clients={self.required})")
        return sorted(nodes)[:fed.clients] if len(nodes) > fed.clients else sorted(nodes)

    def register(self, nodes: list[int]) -> dict[int, str]:
        """Asks new nodes who they are; returns the failures (node -> reason)."""
        payload = proto.Payload(masks=self.masks, config={"run": self.run_text, "masks_digest": self.masks_digest})
        replies = self.transport.exchange("query.register", {n: payload for n in nodes}, self.options.round_timeout)
        failures = {}
        for node in nodes:
            reply = replies.get(node)
            if (why := reply_failure(reply)) is not None:
                failures[node] = why
                continue
            c = reply.payload.config
            p = Participant(node, str(c["name"]), int(c["partition"]), json.loads(str(c["digests"])),
                            int(c["examples"]))
            clash = [q for q in self.participants.values() if q.name == p.name or
                     (p.partition >= 0 and q.partition == p.partition)]
            if clash:
                failures[node] = (f"{p.name} (partition {p.partition}) is already registered as {clash[0].label()}; "
                                  "give every client its own --partition or --client_name")
                continue
            self.participants[node] = p
            self.log(f"registered {p.label()}: {p.examples} images of {len(p.digests)} identities")
        return failures

    def name(self, node: int) -> str:
        return self.participants[node].label() if node in self.participants else f"node {node}"

    def drop(self, failures: dict[int, str]) -> dict[str, str]:
        """Takes failed clients out of this run (a restarted client rejoins as a new node); returns
        the failures by client label."""
        named = {self.name(n): why for n, why in sorted(failures.items())}
        for node, why in failures.items():
            self.participants.pop(node, None)
            self.failed[node] = why
        return named

    def check_enough(self, what: str, answered: int, failures: dict[str, str]) -> None:
        listed = "; ".join(f"{name}: {why}" for name, why in failures.items())
        if answered < self.required:
            raise FederationError(f"{what}: {answered} client(s) answered, the run needs {self.required} "
                                  f"(--min_clients); failed: {listed}")
        if failures:
            self.log(f"{what}: proceeding with {answered} client(s) (--min_clients={self.required}); failed: {listed}")

    # ----------------------------------------------------------------------------- the run

    def label_table(self) -> list[str]:
        path = self.run_dir.path / "labels.json"
        if path.exists():
            return json.loads(path.read_text())["digests"]
        table = proto.label_table(d for p in self.participants.values() for d in p.digests)
        write_json_atomic(path, {"digests": table})
        return table

    def payload(self, node: int, table: list[str], round_index: int, arrays: list[np.ndarray],
                **extra) -> proto.Payload:
        rows = proto.rows_for(table, self.participants[node].digests)
        return proto.Payload(arrays=arrays, masks=self.masks, config={
            "run": self.run_text, "masks_digest": self.masks_digest, "round": round_index,
            "num_classes": len(table), "rows": proto.encode_rows(rows), **extra})

    def run(self) -> dict[str, Any] | None:
        setup, fed = self.setup, self.setup.fed
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        failures = self.drop(self.register(self.wait_for_clients()))
        self.check_enough("registration", len(self.participants), failures)
        table = self.label_table()
        model = setup.model(len(table))
        claim(self.run_dir, setup, "flower", len(table),
              label_table=hashlib.sha256("".join(table).encode()).hexdigest()[:16])
        state = self.run_dir.restore_or(checkpoint_template(setup, len(table), "flower"))
        start = self.run_dir.manager.latest_step() or 0
        global_vars = jax.device_get(state["global"])
        flags = fedbn.local_flags(global_vars, fed.bn)
        last = min(fed.rounds, self.stop_after if self.stop_after is not None else fed.rounds)
        rounds_log = RoundLog(setup, model, self.run_dir.path, start, "flower", self.log)
        if start:
            self.log(f"resuming after round {start} in {self.run_dir.path}")
        if start >= last:
            self.log(f"nothing to do: {start} of {fed.rounds} rounds are finished in {self.run_dir.path}")
        for r in range(start + 1, last + 1):
            began = time.perf_counter()
            self.admit_new_nodes()
            arrays = [np.asarray(x) for x in fedbn.shared_leaves(global_vars, flags)]
            replies = self.transport.exchange("train", {n: self.payload(n, table, r, arrays)
                                                        for n in self.participants}, self.options.round_timeout)
            uploads, failures = self.collect(replies, arrays)
            failures = self.drop(failures)
            self.check_enough(f"round {r}", len(uploads), failures)
            uploads.sort(key=lambda u: (u[0].partition, u[0].name))
            counts = np.asarray([u[2]["examples"] for u in uploads], np.float32)
            stacked = [np.stack(leaves) for leaves in zip(*(u[1] for u in uploads))]
            aggregated = fedbn.fill_shared(global_vars, flags, list(jax.device_get(aggregate_host(stacked, counts))))
            global_vars = jax.device_get(finish_global(setup, model, aggregated))
            seconds = time.perf_counter() - began
            self.run_dir.save(r, {"global": global_vars})
            metrics = {k: np.asarray([u[2][k] for u in uploads]) for k in ("loss", "accuracy")}
            rounds_log.record(r, global_vars, weighted_metrics(metrics, counts), seconds,
                              failed=failures)
            rounds_log.record_clients(r - 1, {u[0].name: {"accuracy": u[2]["eval_accuracy"], "loss": u[2]["eval_loss"],
                                                          "examples": int(u[2]["examples"])} for u in uploads})
        if last == fed.rounds and start < last:
            self.final_evaluation(table, global_vars, flags, rounds_log, last)
        self.run_dir.wait()
        rounds_log.finish()
        return rounds_log.last

    def admit_new_nodes(self) -> None:
        """Registers clients that connected since (a restarted client comes back as a new node)."""
        connected = set(self.transport.nodes())
        room = self.setup.fed.clients - len(self.participants)
        new = sorted(connected - set(self.participants) - set(self.failed))[:max(room, 0)]
        if new:
            for name, why in self.drop(self.register(new)).items():
                self.log(f"{name} could not join: {why}")

    def collect(self, replies: dict[int, proto.Reply], sent: list[np.ndarray]):
        uploads, failures = [], {}
        for node, participant in sorted(self.participants.items()):
            reply = replies.get(node)
            if (why := reply_failure(reply)) is not None:
                failures[node] = why
                continue
            arrays = reply.payload.arrays
            if len(arrays) != len(sent) or any(a.shape != s.shape for a, s in zip(arrays, sent)):
                failures[node] = "sent arrays that do not fit the model"
                continue
            uploads.append((participant, [np.asarray(a, s.dtype) for a, s in zip(arrays, sent)],
                            reply.payload.metrics))
        return uploads, failures

    def final_evaluation(self, table, global_vars, flags, rounds_log: RoundLog, last: int) -> None:
        """Each client's evaluation of the last global model; it also tells clients the run is over."""
        arrays = [np.asarray(x) for x in fedbn.shared_leaves(global_vars, flags)]
        replies = self.transport.exchange("evaluate", {n: self.payload(n, table, last, arrays, final=True)
                                                       for n in self.participants}, self.options.round_timeout)
        results, failures = {}, {}
        for node, participant in self.participants.items():
            reply = replies.get(node)
            if (why := reply_failure(reply)) is not None:
                failures[node] = why
                continue
            m = reply.payload.metrics
            results[participant.name] = {"accuracy": m["eval_accuracy"], "loss": m["eval_loss"],
                                         "examples": int(m["examples"])}
        if results:
            rounds_log.record_clients(last, results)
        if failures:
            self.log("final evaluation: no answer from " + "; ".join(f"{self.name(n)}: {w}"
                                                                      for n, w in failures.items()))


# ------------------------------------------------------------------------------- server job


@dataclasses.dataclass(frozen=True)
class ServerJob:
    """Everything the server process needs, written by the launcher to WORKDIR/server-job.json
    (the ServerApp runs in a process Flower starts, so it reads its job from a file)."""

    config: dict[str, Any]
    federated: dict[str, Any]
    workdir: str
    eval_data: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    stop_after: int | None = None

    STATUS = "federation-status.json"

    def write(self, path: Path) -> None:
        write_json_atomic(path, dataclasses.asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> ServerJob:
        return cls(**json.loads(Path(path).read_text()))


def run_server_job(job: ServerJob, transport: Transport, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Runs the job's federation and records how it ended in WORKDIR/federation-status.json."""
    from jaxdesens.config import TrainConfig
    from jaxdesens.federation.config import FederatedConfig
    from jaxdesens.federation.server import prepare_server

    status_path = Path(job.workdir) / ServerJob.STATUS
    try:
        setup = prepare_server(TrainConfig.from_json(job.config), FederatedConfig(**job.federated), job.eval_data)
        log(f"server: {len(setup.held_out)} held-out images of {setup.held_out.num_classes} identities from "
            f"{setup.held_out.source}; masks: {setup.mask_note}")
        coordinator = Coordinator(setup, job.workdir, ServerOptions(**job.options), transport,
                                  stop_after=job.stop_after, log=log)
        result = coordinator.run()
    except Exception as err:
        write_json_atomic(status_path, {"state": "failed", "message": f"{type(err).__name__}: {err}"})
        raise
    write_json_atomic(status_path, {"state": "finished", "round": None if result is None else result["round"]})
    return result
