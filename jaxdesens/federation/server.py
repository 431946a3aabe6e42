"""The server's side of a run, shared by both engines: its own data (the held-out identities it
verifies on), its masks, the global model's definition, checkpoints and the per-round record.

The server verifies on identities nobody trains on: either the held-out split of a common
`--data` layout (the same split every client computes), or all of its own `--eval_data` folder
(a real deployment, where clients bring their own folders).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdesens.config import TrainConfig
from jaxdesens.data import IdentitySet, load_dataset, split_identities
from jaxdesens.federation import fedbn
from jaxdesens.federation.client import server_model
from jaxdesens.federation.config import FederatedConfig
from jaxdesens.recognizer import Recognizer, network_inputs
from jaxdesens.state import build_model, initial_local_state, initial_variables, make_optimizer
from jaxdesens.train import MaskSource, load_data, mask_fingerprint, mask_source_for
from jaxdesens.workdir import RunDirectory, truncate_jsonl, write_json_atomic


@dataclasses.dataclass
class ServerSetup:
    """What the server derives from (config, fed) and its own data; the model needs the head size."""

    config: TrainConfig
    fed: FederatedConfig
    dataset: IdentitySet  # what the server read (its fingerprint identifies the run's data)
    held_out: IdentitySet
    masks: MaskSource
    mask_note: str
    init_key: jax.Array
    step_key: jax.Array

    def model(self, num_classes: int):
        return build_model(self.config, num_classes)

    def initial_global(self, num_classes: int) -> dict[str, Any]:
        return initial_variables(self.fed.train_config(self.config), self.model(num_classes), self.init_key,
                                 self.held_out.image_shape)

    def mask_fingerprint(self) -> str | None:
        return mask_fingerprint(self.config, self.dataset)


def run_keys(config: TrainConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init, mask, step) keys of a run, the same in every process of it."""
    init_key, mask_key, step_key = jax.random.split(jax.random.key(config.seed), 3)
    return init_key, mask_key, step_key


def server_setup(config: TrainConfig, fed: FederatedConfig, dataset: IdentitySet, held_out: IdentitySet) -> ServerSetup:
    """The run's keys and masks, derived from the config and the data the server read."""
    init_key, mask_key, step_key = run_keys(config)
    masks, note = mask_source_for(config, dataset, mask_key)
    return ServerSetup(config, fed, dataset, held_out, masks, note, init_key, step_key)


def prepare_server(config: TrainConfig, fed: FederatedConfig, eval_data: str | None = None,
                   progress: bool = False) -> ServerSetup:
    if eval_data is not None:
        dataset = load_dataset(eval_data, config.image_size, config.channels, progress=progress)
        return server_setup(config, fed, dataset, dataset)
    dataset = load_data(config, progress=progress)
    _, held_out = split_identities(dataset, config.holdout, seed=config.split_seed)
    return server_setup(config, fed, dataset, held_out)


def claim(run: RunDirectory, setup: ServerSetup, engine: str, num_classes: int, **identity: Any) -> None:
    """Records the run in run.json, or refuses a workdir that holds a different one."""
    run.claim(setup.fed.train_config(setup.config), data_fingerprint=setup.dataset.fingerprint,
              mask_fingerprint=setup.mask_fingerprint(), num_classes=num_classes,
              federated=dataclasses.asdict(setup.fed), engine=engine, **identity)


def checkpoint_template(setup: ServerSetup, num_classes: int, engine: str) -> dict[str, Any]:
    """The per-round checkpoint: the global model, plus the stacked client states in simulation."""
    global_vars = setup.initial_global(num_classes)
    template = {"global": global_vars}
    if engine == "simulation":
        tx = make_optimizer(setup.fed.train_config(setup.config))
        local = jax.jit(initial_local_state, static_argnums=1)(global_vars, tx)
        template["clients"] = jax.tree.map(lambda x: jnp.broadcast_to(x, (setup.fed.clients, *x.shape)), local)
    # on one device: a checkpoint saved on another device count restores here, then goes to the mesh
    return jax.device_put(template, jax.devices()[0])


def eval_inputs(setup: ServerSetup) -> tuple[np.ndarray, np.ndarray | None]:
    """The held-out images as the server's masked evaluation sees them (and their masks)."""
    from jaxdesens.evaluation import EVAL_MASK_SEED

    images = setup.held_out.images
    mask = setup.masks.sample(jax.random.key(EVAL_MASK_SEED), len(images))
    return images, None if mask is None else np.asarray(mask)


def finish_global(setup: ServerSetup, model, aggregated: dict[str, Any]) -> dict[str, Any]:
    """The server's global model after a round. Under FedBN: the shared layers with plain
    BatchNorm whose statistics are re-estimated on the held-out images under the run's masks."""
    global_vars = server_model(aggregated, setup.fed.bn)
    if setup.fed.bn != "local":
        return global_vars
    images, mask = eval_inputs(setup)
    use_fsm = setup.config.model == "fsm"
    size = setup.config.eval_batch_size

    def batches():
        for start in range(0, len(images), size):
            x = jnp.asarray(images[start:start + size], jnp.float32) / 255.0
            m = None if mask is None else jnp.asarray(mask[start:start + size] if len(mask) > 1 else mask)
            yield (*network_inputs(x, m, use_fsm), len(x))

    return fedbn.estimate_batch_stats(model, global_vars, batches())


class RoundLog:
    """Held-out verification of the global model after every round (rounds.jsonl) and each
    client's evaluation of it on its own images (clients.jsonl); printed as they come.

    On resume, lines after the restored round are dropped (they will be recomputed).
    """

    def __init__(self, setup: ServerSetup, model, workdir: Path, start_round: int, engine: str,
                 log: Callable[[str], None] = print):
        self.setup, self.model, self.engine, self.log = setup, model, engine, log
        self.workdir = workdir
        self.path = workdir / "rounds.jsonl"
        self.clients_path = workdir / "clients.jsonl"
        for path in (self.path, self.clients_path):
            truncate_jsonl(path, "round", start_round)
        self.last: dict[str, Any] | None = None

    def record(self, round_index: int, global_vars: dict[str, Any], train: dict[str, float],
               train_seconds: float, failed: dict[str, str] | None = None) -> dict[str, Any]:
        from jaxdesens.evaluation import held_out_verification

        start = time.perf_counter()
        recognizer = Recognizer(self.model, global_vars, self.setup.config)
        evaluation = held_out_verification(recognizer, self.setup.held_out, self.setup.masks,
                                           premasked=self.setup.held_out.mask is not None,
                                           batch_size=self.setup.config.eval_batch_size)
        entry = {"round": round_index, "step": round_index * self.setup.fed.local_steps, "engine": self.engine,
                 **{f"train_{k}": float(v) for k, v in train.items()},
                 "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - start}
        if failed:
            entry["failed_clients"] = failed
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

    def record_clients(self, round_index: int, results: dict[str, dict[str, float]]) -> None:
        """Each client's evaluation of the global model of `round_index` (0 = the initial model)."""
        with open(self.clients_path, "a") as f:
            for name in sorted(results):
                f.write(json.dumps({"round": round_index, "client": name, **results[name]}) + "\n")
        text = ", ".join(f"{name} {r['accuracy']:.3f}" for name, r in sorted(results.items()))
        self.log(f"round {round_index}: clients' own evaluation (accuracy on their images, their BatchNorm): {text}")

    def finish(self) -> None:
        if self.last is not None:
            write_json_atomic(self.workdir / "eval.json", self.last)


def weighted_metrics(metrics: dict[str, np.ndarray], counts: np.ndarray) -> dict[str, float]:
    """Client metrics `(K,)` averaged with the aggregation's weights."""
    weights = np.asarray(counts, np.float64) / np.sum(counts)
    return {k: float(np.dot(weights, np.asarray(v, np.float64))) for k, v in metrics.items()}
