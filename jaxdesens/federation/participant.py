"""A client on a real federation, independent of the engine that delivers its messages.

Every message is handled from scratch (Flower starts a fresh ClientApp process per message):
the client reads its own data, checks what the server sent, and keeps what must outlive a
message (its BatchNorm layers under FedBN, its momentum under `--client_optimizer=local`) in its
own `--workdir`, one checkpoint per round. It answers with parameters, counts and metrics only.
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
import numpy as np

from jaxdesens import parallel
from jaxdesens.config import TrainConfig
from jaxdesens.data import DataError, IdentitySet
from jaxdesens.federation import data as fdata
from jaxdesens.federation import fedbn
from jaxdesens.federation import protocol as proto
from jaxdesens.federation.client import client_evaluation, client_keys, client_update, eval_kwargs, update_kwargs
from jaxdesens.federation.config import FederatedConfig
from jaxdesens.federation.server import run_keys
from jaxdesens.masks import io as mask_io
from jaxdesens.state import build_model, initial_local_state, initial_variables, make_optimizer
from jaxdesens.train import MaskSource, load_data
from jaxdesens.workdir import RunDirectory, write_json_atomic

FINISHED = "federation-finished.json"  # written in the client's workdir when the server ends the run
FAILED = "federation-failed.json"  # written when the client refuses or fails a message (and why)


@dataclasses.dataclass(frozen=True)
class NodeSettings:
    """What a client takes from its own command line; everything else comes from the server."""

    workdir: str
    data: str | None = None
    partition: int = fdata.OWN_DATA
    federation_key: str | None = None
    mask: str | None = None  # the only mask this client accepts
    name: str | None = None

    def label(self) -> str:
        if self.name:
            return self.name
        if self.partition != fdata.OWN_DATA:
            return f"client {self.partition}"
        return f"client {Path(self.data).name}" if self.data else "client (synthetic data)"

    def to_node_config(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_node_config(cls, values: dict[str, Any]) -> NodeSettings:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in fields})


@functools.lru_cache(maxsize=4)
def _compiled(config: TrainConfig, fed: FederatedConfig, num_classes: int):
    """The client's jitted update and evaluation, data-parallel over its own devices."""
    model = build_model(config, num_classes)
    mesh = parallel.make_mesh()
    parallel.local_batch_size(config.batch_size, mesh)
    repl, batch = parallel.replicated(mesh), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        None, parallel.DATA_AXIS))
    update = jax.jit(functools.partial(client_update, **update_kwargs(config, fed, model)),
                     in_shardings=(repl, repl, batch, repl, repl, repl), out_shardings=repl)
    evaluate = jax.jit(functools.partial(client_evaluation, **eval_kwargs(config, fed, model)))
    return model, mesh, update, evaluate


@dataclasses.dataclass(frozen=True)
class RoundContext:
    """Everything a training or evaluation message needs, rebuilt from the message."""

    config: TrainConfig
    fed: FederatedConfig
    masks: MaskSource
    part: IdentitySet  # this client's images, relabelled to the run's classes
    update: Callable
    evaluate: Callable
    mesh: jax.sharding.Mesh
    global_vars: dict[str, Any]
    index: int  # this client's index in the run's key derivation
    step_key: jax.Array
    store: RunDirectory


class Client:
    def __init__(self, settings: NodeSettings, log: Callable[[str], None] = print):
        self.settings, self.log = settings, log
        self.name = settings.label()

    # --------------------------------------------------------------------- shared steps

    def handle(self, action: str, payload: proto.Payload) -> proto.Payload:
        """Answers one message ("register", "train" or "evaluate"). A failure is also written to
        the workdir: the server drops a failed client from the run, so its command stops too."""
        try:
            return getattr(self, action)(payload)
        except Exception as err:
            write_json_atomic(Path(self.settings.workdir) / FAILED, {"action": action, "reason": str(err)})
            raise

    def _run(self, payload: proto.Payload) -> tuple[TrainConfig, FederatedConfig, MaskSource, IdentitySet]:
        """The server's run as this client sees it: config, checked masks and its own images."""
        config, fed = proto.decode_run(str(payload.config["run"]), self.settings.data)
        pinned = mask_io.load_mask(self.settings.mask, config.image_size) if self.settings.mask else None
        digest = str(payload.config["masks_digest"])
        proto.check_masks(payload.masks, digest, pinned, self.name)
        if config.model != "resnet" and not payload.masks:
            raise proto.ProtocolError(f"{self.name} refuses the run: --model={config.model} trains on masked images "
                                      "but the server sent no mask")
        dataset = load_data(config)
        if dataset.mask is not None and proto.masks_digest(proto.mask_arrays(dataset.mask, None)) != \
                proto.masks_digest({"mask": payload.masks.get("mask", np.zeros(0, np.uint8))}):
            raise proto.ProtocolError(f"{self.name} refuses the run: its --data {dataset.source} is an export masked "
                                      "with another mask than the server's")
        share = fdata.client_share(dataset, config, fed, self.settings.partition)
        masks = MaskSource(fixed=None if "mask" not in payload.masks else np.asarray(payload.masks["mask"], np.float32),
                           bank=None if "bank" not in payload.masks else np.asarray(payload.masks["bank"]))
        return config, fed, masks, share

    def _key(self) -> bytes:
        return proto.read_key(self.settings.federation_key)

    # --------------------------------------------------------------------- messages

    def register(self, payload: proto.Payload) -> proto.Payload:
        config, fed, _, share = self._run(payload)
        self._store(config, fed, share, str(payload.config["masks_digest"]))
        return proto.Payload(config={"name": self.name, "partition": self.settings.partition,
                                     "digests": json.dumps(fdata.digests_of(share, self._key())),
                                     "examples": len(share)})

    def _context(self, payload: proto.Payload) -> RoundContext:
        config, fed, masks, share = self._run(payload)
        num_classes = int(payload.config["num_classes"])
        part = fdata.relabel(share, self._key(), proto.decode_rows(str(payload.config["rows"])), num_classes,
                             self.name)
        model, mesh, update, evaluate = _compiled(config, fed, num_classes)
        init_key, _, step_key = run_keys(config)
        template = jax.device_get(initial_variables(fed.train_config(config), model, init_key, part.image_shape))
        flags = fedbn.local_flags(template, fed.bn)
        leaves = [np.asarray(a) for a in payload.arrays]
        expected = fedbn.shared_leaves(template, flags)
        if len(leaves) != len(expected) or any(a.shape != b.shape for a, b in zip(leaves, expected)):
            raise proto.ProtocolError(f"{self.name}: the server's model does not fit the run's configuration")
        global_vars = fedbn.fill_shared(template, flags, [a.astype(b.dtype) for a, b in zip(leaves, expected)])
        index = fdata.client_index(self.settings.partition, share)
        store = self._store(config, fed, share, str(payload.config["masks_digest"]))
        return RoundContext(config, fed, masks, part, update, evaluate, mesh, global_vars, index, step_key, store)

    def _local_state(self, c: RoundContext, round_index: int) -> dict[str, Any]:
        """The client's state after `round_index` (0: the initial one) from its workdir."""
        initial = initial_local_state(c.global_vars, make_optimizer(c.fed.train_config(c.config)))
        if not c.fed.stateful_clients() or round_index == 0:
            return initial
        if round_index in c.store.manager.all_steps():
            import orbax.checkpoint as ocp

            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=device),
                                    initial)
            return c.store.manager.restore(round_index, args=ocp.args.StandardRestore(template))
        self.log(f"{self.name}: WARNING no local state of round {round_index} in {c.store.path} (bn={c.fed.bn}, "
                 f"client_optimizer={c.fed.client_optimizer}); starting from the global model")
        return initial

    def _store(self, config: TrainConfig, fed: FederatedConfig, share: IdentitySet, masks_digest: str) -> RunDirectory:
        store = RunDirectory(self.settings.workdir)
        store.claim(fed.train_config(config), data_fingerprint=share.fingerprint, federated=dataclasses.asdict(fed),
                    engine="flower-client", partition=self.settings.partition, masks_digest=masks_digest)
        return store

    @staticmethod
    def _evaluate(c: RoundContext, local: dict[str, Any]) -> dict[str, float]:
        data = fdata.eval_set(c.part, c.fed, c.index, c.config.seed)
        result = jax.device_get(c.evaluate(c.global_vars, local, data, c.masks))
        return {"eval_loss": float(result["loss"]), "eval_accuracy": float(result["accuracy"]),
                "eval_images": float(min(c.fed.eval_images, len(c.part)))}

    def train(self, payload: proto.Payload) -> proto.Payload:
        began = time.perf_counter()
        round_index = int(payload.config["round"])
        c = self._context(payload)
        local = self._local_state(c, round_index - 1)
        evaluation = self._evaluate(c, local)
        if len(c.part) < c.config.batch_size:
            raise DataError(f"{self.name}: {len(c.part)} images of identities in the run's head, fewer than "
                            f"--batch_size={c.config.batch_size}")
        batches = fdata.round_batches(c.part, c.config, c.fed, c.index, round_index - 1)
        batches = jax.device_put(batches, jax.sharding.NamedSharding(c.mesh, jax.sharding.PartitionSpec(
            None, parallel.DATA_AXIS)))
        key = client_keys(c.step_key, [c.index])[0]
        trained, local, metrics = c.update(c.global_vars, local, batches, c.masks, key,
                                           np.int32((round_index - 1) * c.fed.local_steps))
        trained, metrics = jax.device_get((trained, metrics))
        if c.fed.stateful_clients():
            c.store.save(round_index, local)
            c.store.wait()
        flags = fedbn.local_flags(trained, c.fed.bn)
        seconds = time.perf_counter() - began
        self.log(f"{self.name}: round {round_index} loss {float(metrics['loss']):.4f} ({seconds:.1f} s)")
        return proto.Payload(arrays=[np.asarray(x) for x in fedbn.shared_leaves(trained, flags)],
                             config={"name": self.name, "partition": self.settings.partition},
                             metrics={"examples": float(len(c.part)), "loss": float(metrics["loss"]),
                                      "accuracy": float(metrics["accuracy"]), "seconds": seconds, **evaluation})

    def evaluate(self, payload: proto.Payload) -> proto.Payload:
        round_index = int(payload.config["round"])
        c = self._context(payload)
        evaluation = self._evaluate(c, self._local_state(c, round_index))
        if payload.config.get("final"):
            write_json_atomic(Path(self.settings.workdir) / FINISHED, {"round": round_index, **evaluation})
        return proto.Payload(config={"name": self.name, "partition": self.settings.partition},
                             metrics={"examples": float(len(c.part)), **evaluation})
