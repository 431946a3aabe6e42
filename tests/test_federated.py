"""Federated training: client update vs training step, FedAvg weights, BN modes, splits, and
2 clients x 2 rounds on AT&T in simulation (4 simulated devices) and on Flower over loopback."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PYTHON, ROOT, subprocess_env

from jaxdesens import federated as F
from jaxdesens.config import TrainConfig
from jaxdesens.data import IdentitySet
from jaxdesens.metrics.verification import generate_pairs, verification_report
from jaxdesens.recognizer import load_global, load_recognizer
from jaxdesens.state import (
    TrainState,
    build_model,
    create_train_state,
    initial_local_state,
    lr_schedule,
    make_optimizer,
)
from jaxdesens.train import MaskSource, train_step
from jaxdesens.workdir import ResumeError, RunDirectory


def tree_max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------------- unit tests


def fake_set(identities: int = 6, per_identity: int = 5) -> IdentitySet:
    labels = np.repeat(np.arange(identities), per_identity).astype(np.int32)
    images = np.zeros((len(labels), 4, 4, 3), np.uint8)
    return IdentitySet(images, labels, tuple(f"id{i}" for i in range(identities)), "fp", "fake")


@pytest.mark.parametrize("split", ["iid", "identity"])
def test_partition_covers_the_training_images_disjointly(split):
    data = fake_set()
    parts = F.partition(data, F.FederatedConfig(clients=3, split=split), batch_size=2)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(data)))
    if split == "identity":
        owners = [set(data.labels[p].tolist()) for p in parts]
        assert all(not (owners[i] & owners[j]) for i in range(3) for j in range(i + 1, 3))
    else:
        assert [len(p) for p in parts] == [10, 10, 10]
    assert [p.tolist() for p in F.partition(data, F.FederatedConfig(clients=3, split=split), 2)] == \
        [p.tolist() for p in parts]
    with pytest.raises(Exception, match="fewer images than --batch_size=11"):
        F.partition(data, F.FederatedConfig(clients=3, split=split), batch_size=11)


def test_aggregation_is_the_example_weighted_mean():
    stacked = {"w": np.array([[1.0, 2.0], [5.0, -2.0], [0.0, 8.0]], np.float32),
               "b": np.array([4.0, 0.0, 2.0], np.float32)}
    counts = np.array([1, 2, 5])
    # by hand: (1*x0 + 2*x1 + 5*x2) / 8
    expected = {"w": np.array([(1 + 10 + 0) / 8, (2 - 4 + 40) / 8]), "b": np.array((4 + 0 + 10) / 8)}
    for result in (F.aggregate(stacked, counts), F.aggregate_host(stacked, counts)):
        np.testing.assert_allclose(result["w"], expected["w"], rtol=1e-6)
        np.testing.assert_allclose(result["b"], expected["b"], rtol=1e-6)
    # equal counts = plain mean; one client = that client exactly
    np.testing.assert_allclose(F.aggregate(stacked, np.ones(3))["w"], stacked["w"].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(F.aggregate({"w": stacked["w"][:1]}, np.array([7]))["w"], stacked["w"][0])
    assert F.weighted_metrics({"loss": np.array([1.0, 2.0, 3.0])}, counts)["loss"] == pytest.approx((1 + 4 + 15) / 8)


class TinyNet(nn.Module):
    """The ResNet's calling convention in a few parameters: (logits, features), BatchNorm."""

    fsm_after: int | None = None

    @nn.compact
    def __call__(self, images, mask=None, train: bool = False):
        x = images.reshape(images.shape[0], -1)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(3)(x), {"embedding": x}


def tiny_round(bn: str, optimizer: str = "reset"):
    """A 2-client round function on a tiny BatchNorm net, its data for 2 rounds, and a client
    update that always starts from the statistics it is given (bn=local) to compute expectations."""
    config = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.0)
    fed = F.FederatedConfig(clients=2, rounds=2, local_steps=2, bn=bn, client_optimizer=optimizer)
    model = TinyNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))
    kwargs = F.update_kwargs(config, fed, model)
    local = initial_local_state(variables, kwargs["tx"])
    stacked_local = jax.tree.map(lambda x: jnp.stack([x, x]), local)
    rng = np.random.default_rng(0)
    # client 1's images are much brighter: its BatchNorm statistics differ from client 0's
    images = rng.integers(0, 100, (2, 2, 2, 4, 2, 2, 1)).astype(np.uint8)  # (round, client, step, B, H, W, C)
    images[:, 1] += 150
    labels = rng.integers(0, 3, (2, 2, 2, 4)).astype(np.int32)
    counts = np.array([1.0, 3.0], np.float32)
    keys = F.client_keys(jax.random.key(1), 2)
    round_fn = jax.jit(functools.partial(F.federated_round, **kwargs))
    from_given_stats = jax.jit(functools.partial(F.client_update, **{**kwargs, "bn": "local"}))
    batches = [{"image": images[r], "label": labels[r]} for r in range(2)]
    return round_fn, from_given_stats, variables, stacked_local, batches, counts, keys


@pytest.mark.parametrize("bn", ["average", "local"])
def test_batchnorm_statistics_averaged_or_kept_local(bn):
    round_fn, from_given_stats, variables, local, batches, counts, keys = tiny_round(bn)
    masks = MaskSource()
    global1, local1, _ = round_fn(variables, local, batches[0], counts, masks, keys, np.int32(0))
    stats = local1["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(stats[0], stats[1])  # the clients saw different data
    # the global model carries the example-weighted mean of the clients' statistics (in `local`
    # mode for the server's evaluation only)
    np.testing.assert_allclose(global1["batch_stats"]["BatchNorm_0"]["mean"], (stats[0] + 3 * stats[1]) / 4,
                               rtol=1e-5)
    _, local2, _ = round_fn(global1, local1, batches[1], counts, masks, keys, np.int32(2))
    for c in range(2):
        pick = functools.partial(jax.tree.map, lambda x, c=c: x[c])
        mine = pick(local1)
        start = mine["batch_stats"] if bn == "local" else global1["batch_stats"]
        _, expected, _ = from_given_stats(global1, {**mine, "batch_stats": start}, pick(batches[1]), masks, keys[c],
                                          np.int32(2))
        assert tree_max_diff(pick(local2["batch_stats"]), expected["batch_stats"]) < 1e-6
    # the other source of statistics is not read at all: poisoning it changes nothing
    def nan(tree):
        return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), tree)

    if bn == "local":
        poisoned = round_fn({**global1, "batch_stats": nan(global1["batch_stats"])}, local1, batches[1], counts,
                            masks, keys, np.int32(2))
    else:
        poisoned = round_fn(global1, {**local1, "batch_stats": nan(local1["batch_stats"])}, batches[1], counts,
                            masks, keys, np.int32(2))
    assert tree_max_diff(poisoned[1]["batch_stats"], local2["batch_stats"]) == 0.0


def test_client_optimizer_reset_restarts_momentum_and_local_keeps_it():
    final = {}
    for mode in ("reset", "local"):
        round_fn, _, variables, local, batches, counts, keys = tiny_round("average", mode)
        g1, l1, _ = round_fn(variables, local, batches[0], counts, MaskSource(), keys, np.int32(0))
        g2, l2, _ = round_fn(g1, l1, batches[1], counts, MaskSource(), keys, np.int32(2))
        step_counts = [np.asarray(x) for x in jax.tree.leaves(l2["opt_state"]) if np.asarray(x).dtype == np.int32]
        assert [c.tolist() for c in step_counts] == [[4, 4]]  # the schedule's step count is global in both modes
        final[mode] = (g1, g2)
    np.testing.assert_array_equal(final["reset"][0]["params"]["Dense_0"]["kernel"],
                                  final["local"][0]["params"]["Dense_0"]["kernel"])  # round 1: the same
    assert tree_max_diff(final["reset"][1]["params"], final["local"][1]["params"]) > 1e-4  # momentum carried


def test_one_client_one_local_step_is_the_training_step():
    config = TrainConfig(model="fsm", width=0.125, image_size=16, batch_size=8, lr=0.1)
    fed = F.FederatedConfig(clients=1, rounds=3, local_steps=1, client_optimizer="reset")
    train_config = fed.train_config(config)
    model = build_model(config, 5)
    state = create_train_state(train_config, model, jax.random.key(0), (16, 16, 3))
    mask = np.ones((16, 16), np.float32)
    mask[4:12, 2:14] = 0
    masks = MaskSource(fixed=jnp.asarray(mask))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 255, (8, 16, 16, 3)).astype(np.uint8),
             "label": rng.integers(0, 5, 8).astype(np.int32)}
    key = jax.random.key(3)
    expected, _ = jax.jit(functools.partial(train_step, use_fsm=True, schedule=lr_schedule(train_config)))(
        state, batch, masks, key)
    mesh = F.client_mesh(1, 8, jax.devices()[:1])
    round_fn = F.compile_federated_round(config, fed, model, mesh)
    global_vars = {"params": state.params, "batch_stats": state.batch_stats}
    local = jax.tree.map(lambda x: x[None], initial_local_state(global_vars, make_optimizer(train_config)))
    new_global, _, metrics = round_fn(global_vars, local, jax.tree.map(lambda x: x[None, None], batch),
                                      np.array([8.0], np.float32), masks, key[None], np.int32(0))
    # Float32 rounding of two differently compiled programs: measured 3.5e-6 on a step that moves the
    # parameters by about 1 (scale-1 residual branches; in float64 the two agree exactly, issue 16's notes).
    update = tree_max_diff(expected.params, state.params)
    assert update > 0.1
    assert tree_max_diff(new_global["params"], expected.params) < 1e-5 * update
    assert tree_max_diff(new_global["batch_stats"], expected.batch_stats) < 1e-6
    assert float(metrics["lr"][0]) == pytest.approx(0.1)


def test_client_mesh_uses_every_device_and_checks_the_batch():
    devices = [object() for _ in range(4)]  # the mesh only arranges them
    assert dict(F.client_mesh(2, 16, devices).shape) == {"clients": 2, "data": 2}
    assert dict(F.client_mesh(3, 16, devices).shape) == {"clients": 1, "data": 4}
    assert dict(F.client_mesh(8, 16, devices).shape) == {"clients": 4, "data": 1}
    with pytest.raises(ValueError, match="multiple of 4"):
        F.client_mesh(3, 18, devices)


@pytest.mark.slow
def test_fedavg_end_to_end_weights_clients_of_different_sizes(tmp_path):
    """One simulated round with clients holding different numbers of images: the saved global model
    is the example-weighted mean of each client's training step, computed here client by client."""
    config = TrainConfig(model="resnet", width=0.125, image_size=16, batch_size=4, synthetic_identities=9,
                         synthetic_images_per_identity=4, holdout=2, lr=0.1)
    fed = F.FederatedConfig(clients=2, rounds=1, local_steps=1, split="identity")
    F.run_simulation(config, fed, tmp_path, log=lambda _: None)
    saved, _ = load_global(tmp_path, 1)

    setup = F.prepare(config, fed)
    counts = np.array([len(p) for p in setup.parts], np.float64)
    assert counts.tolist() == [16.0, 12.0]  # 7 training identities of 4 images: 4 and 3 per client
    train_config = fed.train_config(config)
    step = jax.jit(functools.partial(train_step, use_fsm=False, schedule=lr_schedule(train_config)))
    start = setup.initial_global()
    updates = []
    for client in range(fed.clients):
        batch = jax.tree.map(lambda x: x[0], F.round_batches(setup.client_part(client), config, fed, client, 0))
        state = TrainState.create(apply_fn=setup.model.apply, params=start["params"],
                                  batch_stats=start["batch_stats"], tx=make_optimizer(train_config))
        new, _ = step(state, batch, setup.masks, jax.random.fold_in(setup.step_key, client))
        updates.append({"params": new.params, "batch_stats": new.batch_stats})
    weighted = jax.tree.map(lambda a, b: (counts[0] * np.asarray(a, np.float64) + counts[1] * np.asarray(b)) / 28,
                            *updates)
    unweighted = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) + np.asarray(b)) / 2, *updates)
    error, spread = tree_max_diff(saved.variables, weighted), tree_max_diff(weighted, unweighted)
    # Measured: error 1.5e-4 (float32 rounding through train-mode BatchNorm on 4-image batches, scale-1
    # residual branches), spread 0.27.
    assert error < 1e-3
    assert error < 0.05 * spread  # the weighting is visible far beyond the rounding


def test_workdir_refuses_other_federated_settings(tmp_path):
    config = TrainConfig(model="resnet", width=0.125, image_size=16, batch_size=4, synthetic_identities=8,
                         synthetic_images_per_identity=4, holdout=0.25)
    setup = F.prepare(config, F.FederatedConfig(clients=2, rounds=2, local_steps=2))
    F.claim(RunDirectory(tmp_path), setup, "simulation")
    F.claim(RunDirectory(tmp_path), setup, "simulation")
    other = dataclasses.replace(setup, fed=F.FederatedConfig(clients=2, rounds=2, local_steps=2, bn="local"))
    with pytest.raises(ResumeError, match="'bn': 'average'"):
        F.claim(RunDirectory(tmp_path), other, "simulation")
    with pytest.raises(ResumeError, match="engine: 'simulation' -> 'flower'"):
        F.claim(RunDirectory(tmp_path), setup, "flower")


# ------------------------------------------------------------------------- AT&T, 2 x 2 rounds


# stateful clients (local BN statistics and momentum), so resuming must restore client state too
ATT_FLAGS = ["--model=fsm", "--width=0.125", "--image_size=32", "--batch_size=16", "--local_steps=2",
             "--clients=2", "--rounds=2", "--lr=0.05", "--bn=local", "--client_optimizer=local"]


def run_federated(workdir: Path, *flags: str, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [PYTHON, str(ROOT / "launch" / "federated.py"), f"--workdir={workdir}", *ATT_FLAGS, *flags]
    result = subprocess.run(command, env=subprocess_env(devices), capture_output=True, text=True, timeout=timeout,
                            check=False)
    if result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stdout}\n{result.stderr}")
    return result


def rounds(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def att_mask(att_dir, tmp_path_factory) -> Path:
    """A server mask hiding the upper face (eyes), as a searched mask would."""
    mask = np.ones((32, 32), np.float32)
    mask[6:16, 3:29] = 0
    path = tmp_path_factory.mktemp("mask") / "mask.npy"
    np.save(path, mask)
    return path


@pytest.fixture(scope="module")
def simulated(att_dir, att_mask, tmp_path_factory) -> Path:
    """2 clients x 2 rounds on 4 simulated devices, stopped after round 1 and resumed."""
    workdir = tmp_path_factory.mktemp("fed_sim")
    first = run_federated(workdir, f"--data={att_dir}", f"--mask={att_mask}", "--stop_after=1", devices=4)
    assert "mesh {'clients': 2, 'data': 2} of 4 cpu device(s)" in first.stdout
    assert "round 1/2: held-out clean accuracy" in first.stdout
    assert [r["round"] for r in rounds(workdir)] == [1]
    second = run_federated(workdir, f"--data={att_dir}", f"--mask={att_mask}", devices=4)
    assert "resuming after round 1" in second.stdout
    assert "round 1/2" not in second.stdout and "round 2/2: held-out clean accuracy" in second.stdout
    return workdir


@pytest.mark.slow
def test_simulation_on_att_reports_every_round_and_resumes(simulated):
    entries = rounds(simulated)
    assert [e["round"] for e in entries] == [1, 2]
    record = json.loads((simulated / "run.json").read_text())
    setup = F.prepare(TrainConfig.from_json(record["config"]), F.FederatedConfig(**record["federated"]))
    held_out, mask = setup.held_out, np.asarray(setup.masks.fixed)
    pairs = generate_pairs(held_out.labels, None, seed=0, n_folds=10)
    for entry in entries:
        assert entry["engine"] == "simulation" and entry["step"] == 2 * entry["round"]
        # the logged accuracies are the saved global model's, recomputed here from its checkpoint
        recognizer, _ = load_global(simulated, entry["round"])
        forward = jax.jit(recognizer.model.apply)
        x = held_out.images.astype(np.float32) / 255.0
        under_mask = (x * mask[None, :, :, None], mask[None, :, :, None])
        for name, images, fsm_mask in (("clean", x, None), ("masked", *under_mask)):
            embedding = np.asarray(forward(recognizer.variables, images, fsm_mask)[1]["embedding"])
            expected = verification_report(embedding[pairs.left], embedding[pairs.right], pairs.issame, pairs.fold)
            assert entry[name]["accuracy"] == pytest.approx(expected["accuracy"]), (name, entry)
            assert entry[name]["auc"] == pytest.approx(expected["auc"], abs=1e-6), (name, entry)
    assert record["federated"]["clients"] == 2 and record["config"]["steps"] == 4
    assert json.loads((simulated / "eval.json").read_text())["round"] == 2
    # every command that takes --checkpoint reads the last round's global model
    last, round_index = load_global(simulated)
    assert round_index == 2 and tree_max_diff(load_recognizer(simulated).variables, last.variables) == 0


@pytest.mark.slow
def test_flower_over_loopback_matches_the_simulation(simulated, att_dir, att_mask, tmp_path):
    import flwr  # noqa: F401  (a declared test dependency: missing, this test fails rather than skips)
    workdir = tmp_path / "flower"
    flags = [f"--data={att_dir}", f"--mask={att_mask}", "--engine=flower"]
    first = run_federated(workdir, *flags, "--stop_after=1", devices=1)
    assert "round 1/2: held-out clean accuracy" in first.stdout
    result = run_federated(workdir, *flags, devices=1)  # new server and client processes
    assert "resuming after round 1" in result.stdout and "round 2/2: held-out clean accuracy" in result.stdout
    for i in range(2):  # each client process trained only on its own part, and kept its own state
        log = (workdir / f"client_{i}.log").read_text()
        assert f"client {i}: 150 images" in log and f"client {i}: round 2 loss" in log
        assert f"client {i}: restoring its local state of round 1" in log
    assert [e["round"] for e in rounds(workdir)] == [1, 2]
    # Same seed, same data parts, same client function and aggregation, yet NOT the same numbers: issue 16's
    # finding 8, open on main. Measured (each leaf's largest difference over its largest value): 2.9% in
    # round 1 and 5.3% in round 2 with issue 17's CPU convolution policy and max-pool gradient (before it
    # 3e-5 absolute in round 1 and 9e-4 in round 2); the 4-device data-parallel training test still equals
    # one device, and vmapped clients' gradients agree to 3e-5 of their scale, so the cause is not found.
    # The bound only catches gross errors (a client on another part or without the mask moves whole leaves).
    for r in (1, 2):  # both round 2s ran after a resume: the restored server and client states are checked too
        flower, _ = load_global(workdir, r)
        simulation, _ = load_global(simulated, r)
        worst = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(b).max())
                    for a, b in zip(jax.tree.leaves(flower.variables), jax.tree.leaves(simulation.variables)))
        assert worst < 0.1, f"round {r}: {worst:.3g}"
