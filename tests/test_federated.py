"""Federated training without Flower: client update vs training step, FedAvg weights, FedBN, the
simulation's mesh, the protocol (masks, keyed identity digests, nothing else crossing), the
server loop with in-process clients (equal to the simulation; faults named), and 2 clients x 2
rounds of the simulation on AT&T. The Flower runtime itself is in test_flower.py."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PYTHON, ROOT, no_deprecation, subprocess_env, write_identity_folder

from jaxdesens.config import TrainConfig
from jaxdesens.data import IdentitySet
from jaxdesens.federation import client as C
from jaxdesens.federation import data as D
from jaxdesens.federation import fedbn
from jaxdesens.federation import protocol as proto
from jaxdesens.federation import simulation as S
from jaxdesens.federation.config import FederatedConfig, ServerOptions
from jaxdesens.federation.coordinator import FederationError, ServerJob, run_server_job
from jaxdesens.federation.participant import Client, NodeSettings
from jaxdesens.metrics.verification import generate_pairs, verification_report
from jaxdesens.recognizer import load_global, load_recognizer
from jaxdesens.state import (
    TrainState,
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
    parts = D.partition(data, FederatedConfig(clients=3, split=split), batch_size=2)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(data)))
    if split == "identity":
        owners = [set(data.labels[p].tolist()) for p in parts]
        assert all(not (owners[i] & owners[j]) for i in range(3) for j in range(i + 1, 3))
    else:
        assert [len(p) for p in parts] == [10, 10, 10]
    assert [p.tolist() for p in D.partition(data, FederatedConfig(clients=3, split=split), 2)] == \
        [p.tolist() for p in parts]
    with pytest.raises(Exception, match="fewer images than --batch_size=11"):
        D.partition(data, FederatedConfig(clients=3, split=split), batch_size=11)


def test_aggregation_is_the_example_weighted_mean():
    from jaxdesens.federation.server import weighted_metrics

    stacked = {"w": np.array([[1.0, 2.0], [5.0, -2.0], [0.0, 8.0]], np.float32),
               "b": np.array([4.0, 0.0, 2.0], np.float32)}
    counts = np.array([1, 2, 5])
    # by hand: (1*x0 + 2*x1 + 5*x2) / 8
    expected = {"w": np.array([(1 + 10 + 0) / 8, (2 - 4 + 40) / 8]), "b": np.array((4 + 0 + 10) / 8)}
    for result in (C.aggregate(stacked, counts), C.aggregate_host(stacked, counts)):
        np.testing.assert_allclose(result["w"], expected["w"], rtol=1e-6)
        np.testing.assert_allclose(result["b"], expected["b"], rtol=1e-6)
    # equal counts = plain mean; one client = that client exactly
    np.testing.assert_allclose(C.aggregate(stacked, np.ones(3))["w"], stacked["w"].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(C.aggregate({"w": stacked["w"][:1]}, np.array([7]))["w"], stacked["w"][0])
    assert weighted_metrics({"loss": np.array([1.0, 2.0, 3.0])}, counts)["loss"] == pytest.approx((1 + 4 + 15) / 8)


class TinyNet(nn.Module):
    """The ResNet's calling convention in a few parameters: (logits, features), a BatchNorm layer
    before the classifier (so a client's BatchNorm changes what its Dense layer learns)."""

    fsm_after: int | None = None

    @nn.compact
    def __call__(self, images, mask=None, train: bool = False):
        x = images.reshape(images.shape[0], -1)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(x), {"embedding": x}


def tiny_round(bn: str, optimizer: str = "reset"):
    """A 2-client round function on a tiny BatchNorm net, its data for 2 rounds, its clients'
    evaluation, and the single-client update (to compute expectations by hand)."""
    config = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.0)
    fed = FederatedConfig(clients=2, rounds=2, local_steps=2, bn=bn, client_optimizer=optimizer)
    model = TinyNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))
    kwargs = C.update_kwargs(config, fed, model)
    local = initial_local_state(variables, kwargs["tx"])
    stacked_local = jax.tree.map(lambda x: jnp.stack([x, x]), local)
    rng = np.random.default_rng(0)
    # client 1's images are much brighter: its BatchNorm layer learns other values than client 0's
    images = rng.integers(0, 100, (2, 2, 2, 4, 2, 2, 1)).astype(np.uint8)  # (round, client, step, B, H, W, C)
    images[:, 1] += 150
    labels = rng.integers(0, 3, (2, 2, 2, 4)).astype(np.int32)
    counts = np.array([1.0, 3.0], np.float32)
    keys = C.client_keys(jax.random.key(1), 2)
    round_fn = jax.jit(functools.partial(S.federated_round, **kwargs))
    one_client = jax.jit(functools.partial(C.client_update, **kwargs))
    evaluate = jax.jit(functools.partial(S.evaluate_clients, **C.eval_kwargs(config, fed, model)))
    own = {"image": images[0, :, 0], "label": labels[0, :, 0], "weight": np.ones((2, 4), np.float32)}
    batches = [{"image": images[r], "label": labels[r]} for r in range(2)]
    return round_fn, one_client, evaluate, own, variables, stacked_local, batches, counts, keys


def two_rounds(bn: str, optimizer: str = "reset"):
    round_fn, _, evaluate, own, variables, local, batches, counts, keys = tiny_round(bn, optimizer)
    g1, l1, _ = round_fn(variables, local, batches[0], counts, MaskSource(), keys, np.int32(0))
    g2, l2, _ = round_fn(g1, l1, batches[1], counts, MaskSource(), keys, np.int32(2))
    return g1, l1, g2, l2, evaluate(g2, l2, own, MaskSource())


def bn_of(tree):
    return {"scale": tree["params"]["BatchNorm_0"]["scale"], "bias": tree["params"]["BatchNorm_0"]["bias"],
            **tree["batch_stats"]["BatchNorm_0"]}


def test_fedbn_keeps_every_batchnorm_layer_on_its_client():
    """--bn=local (finding 1: it changed nothing): scale, bias and statistics never averaged,
    each client trains and evaluates with its own, and the shared layers learn differently."""
    round_fn, one_client, evaluate, own, variables, local, batches, counts, keys = tiny_round("local")
    g1, l1, _ = round_fn(variables, local, batches[0], counts, MaskSource(), keys, np.int32(0))
    mine = [jax.tree.map(lambda x, c=c: x[c], l1) for c in range(2)]
    assert tree_max_diff(bn_of(mine[0]["variables"])["scale"], bn_of(mine[1]["variables"])["scale"]) > 1e-3
    # the server never holds a client's BatchNorm: its global model has the plain layer
    for name, value in bn_of(g1).items():
        np.testing.assert_array_equal(value, 1.0 if name in ("scale", "var") else 0.0)
    g2, l2, _ = round_fn(g1, l1, batches[1], counts, MaskSource(), keys, np.int32(2))
    for c in range(2):  # round 2 of client c = the shared layers + client c's own BatchNorm of round 1
        start = {"params": {**g1["params"], "BatchNorm_0": mine[c]["variables"]["params"]["BatchNorm_0"]},
                 "batch_stats": mine[c]["variables"]["batch_stats"]}
        trained, _, _ = one_client(start, mine[c], jax.tree.map(lambda x, c=c: x[c], batches[1]), MaskSource(),
                                   keys[c], np.int32(2))
        assert tree_max_diff(jax.tree.map(lambda x, c=c: x[c], l2["variables"]), trained) < 1e-6
    # the global BatchNorm layer is not read at all: poisoning it changes nothing
    poisoned = {"params": {**g1["params"], "BatchNorm_0": jax.tree.map(lambda x: x * np.nan,
                                                                        g1["params"]["BatchNorm_0"])},
                "batch_stats": jax.tree.map(lambda x: x * np.nan, g1["batch_stats"])}
    assert tree_max_diff(round_fn(poisoned, l1, batches[1], counts, MaskSource(), keys, np.int32(2))[1], l2) == 0
    # against bn=average: different shared layers after round 2, different client evaluations
    _, _, g2_avg, _, eval_avg = two_rounds("average")
    _, _, g2_local, l2_local, eval_local = two_rounds("local")
    assert tree_max_diff(g2_avg["params"]["Dense_0"], g2_local["params"]["Dense_0"]) > 1e-5  # identical before
    assert abs(float(eval_avg["loss"][1]) - float(eval_local["loss"][1])) > 1e-3
    # each client evaluates the global model with its own BatchNorm (by hand for client 1)
    by_hand = fedbn.merge(g2_local, jax.tree.map(lambda x: x[1], l2_local["variables"]),
                          fedbn.local_flags(g2_local, "local"))
    logits, _ = TinyNet().apply(by_hand, own["image"][1].astype(np.float32) / 255.0)
    loss = -jax.nn.log_softmax(logits)[np.arange(4), own["label"][1]].mean()
    assert float(eval_local["loss"][1]) == pytest.approx(float(loss), rel=1e-5)


def test_average_mode_averages_batchnorm_like_any_layer():
    g1, l1, _, _, _ = two_rounds("average")
    clients = [bn_of(jax.tree.map(lambda x, c=c: x[c], l1["variables"])) for c in range(2)]
    for name, value in bn_of(g1).items():  # counts 1 and 3
        np.testing.assert_allclose(value, (clients[0][name] + 3 * clients[1][name]) / 4, rtol=1e-5, atol=1e-7)


def test_client_optimizer_reset_restarts_momentum_and_local_keeps_it():
    final = {}
    for mode in ("reset", "local"):
        g1, _, g2, l2, _ = two_rounds("average", mode)
        step_counts = [np.asarray(x) for x in jax.tree.leaves(l2["opt_state"]) if np.asarray(x).dtype == np.int32]
        assert [c.tolist() for c in step_counts] == [[4, 4]]  # the schedule's step count is global in both modes
        final[mode] = (g1, g2)
    np.testing.assert_array_equal(final["reset"][0]["params"]["Dense_0"]["kernel"],
                                  final["local"][0]["params"]["Dense_0"]["kernel"])  # round 1: the same
    assert tree_max_diff(final["reset"][1]["params"], final["local"][1]["params"]) > 1e-4  # momentum carried


def test_precise_batchnorm_estimate_is_the_statistics_of_the_images():
    model = TinyNet()
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(12, 2, 2, 1)).astype(np.float32)
    variables = model.init(jax.random.key(0), images[:1])
    one = fedbn.estimate_batch_stats(model, variables, iter([(images, None, 12)]))["batch_stats"]["BatchNorm_0"]
    flat = images.reshape(12, -1)
    np.testing.assert_allclose(one["mean"], flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(one["var"], flat.var(0), rtol=1e-4)
    halves = fedbn.estimate_batch_stats(model, variables, iter([(images[:6], None, 6), (images[6:], None, 6)]))
    np.testing.assert_allclose(halves["batch_stats"]["BatchNorm_0"]["mean"], flat.mean(0), rtol=1e-5)


def test_client_mesh_uses_every_device_and_checks_the_batch():
    devices = [object() for _ in range(4)]  # the mesh only arranges them
    assert dict(S.client_mesh(2, 16, devices).shape) == {"clients": 2, "data": 2}
    assert dict(S.client_mesh(3, 16, devices).shape) == {"clients": 1, "data": 4}
    assert dict(S.client_mesh(8, 16, devices).shape) == {"clients": 4, "data": 1}
    with pytest.raises(ValueError, match="multiple of 4"):
        S.client_mesh(3, 18, devices)


MESH_PROBE = textwrap.dedent("""
    import json, re, sys
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jaxdesens.config import TrainConfig
    from jaxdesens.federation import simulation as S
    from jaxdesens.federation.client import client_keys
    from jaxdesens.federation.config import FederatedConfig
    from jaxdesens.state import initial_local_state, initial_variables, make_optimizer
    from jaxdesens.train import MaskSource

    class TwoConvs(nn.Module):
        # the ResNet's calling convention with two convolutions and a BatchNorm: what the mesh
        # does to vmapped clients' convolutions does not depend on the depth (compiles in seconds)
        fsm_after: int = 1

        @nn.compact
        def __call__(self, images, mask=None, train=False):
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(images)))
            x = nn.Conv(8, (3, 3), strides=2)(x * mask if mask is not None else x).mean((1, 2))
            return nn.Dense(10)(x), {"embedding": x}

    out = {}
    for clients in (3, 2):
        config = TrainConfig(model="fsm", width=0.125, image_size=16, batch_size=16)
        fed = FederatedConfig(clients=clients, rounds=1, local_steps=1)
        model = TwoConvs()
        mesh = S.client_mesh(clients, config.batch_size)
        g = initial_variables(fed.train_config(config), model, jax.random.key(0), (16, 16, 3))
        local = jax.tree.map(lambda x: jnp.stack([x] * clients), initial_local_state(g, make_optimizer(config)))
        batches = {"image": np.zeros((clients, 1, 16, 16, 16, 3), np.uint8),
                   "label": np.zeros((clients, 1, 16), np.int32)}
        mask = np.ones((16, 16), np.float32); mask[4:8] = 0
        hlo = S.compile_federated_round(config, fed, model, mesh).lower(
            g, local, batches, np.ones(clients, np.float32), MaskSource(fixed=jnp.asarray(mask)),
            client_keys(jax.random.key(1), clients), np.int32(0)).compile().as_text()
        ops = re.findall(r"\\b(all-gather|all-reduce|reduce-scatter|all-to-all)[a-z-]*\\(", hlo)
        # per-device image batches of the convolutions on images (forward and input gradient):
        # kernel gradients (->01bf) have no batch dimension
        batches = sorted({int(b) for b in re.findall(
            r"= f32\\[(\\d+),\\d+,\\d+,\\d+\\][^ ]* convolution\\([^\\n]*dim_labels=b01f_\\w+->b01f", hlo)})
        out[clients] = {"mesh": dict(mesh.shape), "gathers": ops.count("all-gather"),
                        "reduces": ops.count("all-reduce"), "conv_batches": batches}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_simulation_mesh_splits_every_client_batch_over_its_devices():
    """Finding 7: with 3 clients on 4 devices the vmapped clients' grouped convolutions were not
    split: every device ran every client's full batch of 16 behind 49 all-gathers (one local step)."""
    result = subprocess.run([PYTHON, "-c", MESH_PROBE], env=subprocess_env(4), capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    three, two = probe["3"], probe["2"]
    assert three["mesh"] == {"clients": 1, "data": 4} and two["mesh"] == {"clients": 2, "data": 2}
    assert three["gathers"] == 0 and two["gathers"] == 0
    assert three["reduces"] > 0 and two["reduces"] > 0  # the batch is split: statistics and gradients are summed
    assert set(three["conv_batches"]) <= {1, 4} and 4 in three["conv_batches"]  # 16 images / 4 devices
    assert set(two["conv_batches"]) <= {1, 8} and 8 in two["conv_batches"]  # 16 images / 2 devices per client


# ------------------------------------------------------------------------------------ protocol


def test_masks_travel_with_their_digest_and_a_pinned_client_refuses_others():
    """Finding 2 (a client with an all-ones mask joined): the server's masks come with a digest;
    a client pinned to a mask by --mask refuses any other."""
    mask = np.ones((8, 8), np.float32)
    mask[2:5] = 0
    arrays = proto.mask_arrays(mask, None)
    digest = proto.masks_digest(arrays)
    proto.check_masks(arrays, digest, None, "client 0")
    proto.check_masks(arrays, digest, mask, "client 0")
    tampered = {"mask": arrays["mask"].copy()}
    tampered["mask"][0, 0] = 0
    with pytest.raises(proto.ProtocolError, match="do not match their sha256 digest"):
        proto.check_masks(tampered, digest, None, "client 0")
    with pytest.raises(proto.ProtocolError, match="client 0 refuses the run: it accepts only the mask"):
        proto.check_masks(arrays, digest, np.ones((8, 8), np.float32), "client 0")
    bank = proto.mask_arrays(None, np.ones((2, 3, 8, 8), np.uint8))
    with pytest.raises(proto.ProtocolError, match="the server sends random level masks"):
        proto.check_masks(bank, proto.masks_digest(bank), mask, "client 0")


def test_identity_digests_are_keyed_and_order_the_head():
    names = ["alice", "bob", "carol"]
    a, b = proto.read_key(None), b"another federation's secret key"
    assert proto.identity_digest(a, "alice") != proto.identity_digest(b, "alice")
    rows = proto.head_order(names, b)
    assert sorted(rows.tolist()) == [0, 1, 2]
    table = proto.label_table(proto.identity_digest(b, n) for n in names)
    assert [table[r] for r in rows] == [proto.identity_digest(b, n) for n in names]
    assert proto.rows_for(table, [table[2], "unknown"]) == {table[2]: 2}


# ------------------------------------------------------------------ the server with in-process clients


class LocalTransport:
    """Delivers each message to a fresh `Client` in this process, as Flower delivers it to a fresh
    ClientApp process; records everything that crosses."""

    def __init__(self, settings: dict[int, NodeSettings], broken: dict[int, Exception] | None = None):
        self.settings, self.broken = settings, broken or {}
        self.sent: list[tuple[str, int, proto.Payload]] = []
        self.received: list[tuple[str, int, proto.Payload]] = []

    def nodes(self) -> list[int]:
        return sorted(self.settings)

    def exchange(self, kind, payloads, timeout):
        replies = {}
        for node, payload in payloads.items():
            self.sent.append((kind, node, payload))
            try:
                if node in self.broken and kind == "train":
                    raise self.broken[node]
                reply = Client(self.settings[node], log=lambda _: None).handle(kind.split(".")[-1], payload)
                self.received.append((kind, node, reply))
                replies[node] = proto.Reply(payload=reply)
            except Exception as err:  # as Flower reports a ClientApp's exception
                replies[node] = proto.Reply(error=f"<class '{type(err).__name__}'>:<'{err}'>")
        return replies


# Flower's run (2 client processes, a SuperLink) against the simulation (2 clients in one jitted
# round, resumed by another process): measured 0.0 in rounds 1 and 2 (the same XLA programs and
# flags; the float32 arrays cross Flower's records unchanged).
FLOWER_AGREEMENT = 1e-6
INPROC = TrainConfig(model="fsm", width=0.125, image_size=16, batch_size=4, holdout=2, lr=0.1, seed=3)
INPROC_FED = FederatedConfig(clients=2, rounds=2, local_steps=1, split="identity", bn="local",
                             client_optimizer="local", eval_images=8)
INPROC_FLAGS = ["--model=fsm", "--width=0.125", "--image_size=16", "--batch_size=4", "--holdout=2", "--lr=0.1",
                "--seed=3", "--clients=2", "--rounds=2", "--local_steps=1", "--split=identity", "--bn=local",
                "--client_optimizer=local", "--eval_images=8"]  # INPROC and INPROC_FED as command-line flags


def federate(*flags: str, devices: int = 1) -> subprocess.CompletedProcess:
    """`launch/federated.py` in a child process; fails the test with its output if it fails."""
    command = [PYTHON, str(ROOT / "launch" / "federated.py"), *INPROC_FLAGS, *flags]
    result = subprocess.run(command, env=subprocess_env(devices), capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def inproc_run(workdir: Path, data: Path, key: Path, broken=None, options: ServerOptions | None = None,
               stop_after=None, fed: FederatedConfig = INPROC_FED, config: TrainConfig = INPROC):
    transport = LocalTransport({10 + i: NodeSettings(workdir=str(workdir / f"client_{i}"), data=str(data),
                                                     partition=i, federation_key=str(key))
                                for i in range(fed.clients)}, broken)
    job = ServerJob(config=dataclasses.replace(config, data=str(data)).to_json(), federated=dataclasses.asdict(fed),
                    workdir=str(workdir / "server"), options=dataclasses.asdict(options or ServerOptions()),
                    stop_after=stop_after)
    logs = []
    result = run_server_job(job, transport, log=logs.append)
    return transport, logs, result


def assert_same_client_evaluations(a: Path, b: Path) -> None:
    """Two runs' clients.jsonl: the same clients, rounds, counts and accuracies; losses up to the
    float32 rounding of another process (measured 1e-7 of a loss)."""
    runs = [[json.loads(x) for x in (w / "clients.jsonl").read_text().splitlines()] for w in (a, b)]
    assert len(runs[0]) == len(runs[1]) == 6  # 2 clients x rounds 0, 1, 2
    for x, y in zip(*runs):
        assert (x["round"], x["client"], x["examples"], x["accuracy"]) == \
            (y["round"], y["client"], y["examples"], y["accuracy"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def inproc(tmp_path_factory):
    """A 2-client federation with in-process clients on a folder of 9 named people under a fixed
    mask, stopped after round 1 and resumed, and the simulation of the same run, also stopped
    (in this process) and resumed (by the command line: stateful clients, FedBN and momentum, so
    a resume must restore every client's state)."""
    root = tmp_path_factory.mktemp("inproc")
    data = write_identity_folder(root / "people", identities=9, per_identity=4, size=16)
    key = root / "federation.key"
    key.write_bytes(b"a secret only the clients hold!!")
    mask = np.ones((16, 16), np.float32)
    mask[3:8, 2:14] = 0
    np.save(root / "mask.npy", mask)
    config = dataclasses.replace(INPROC, data=str(data), mask=str(root / "mask.npy"))
    first = inproc_run(root, data, key, stop_after=1, config=config)
    second = inproc_run(root, data, key, config=config)
    S.run_simulation(config, INPROC_FED, root / "simulation", federation_key=str(key), stop_after=1,
                     log=lambda _: None)
    resumed = federate(f"--data={data}", f"--mask={root / 'mask.npy'}", f"--federation_key={key}",
                       f"--workdir={root / 'simulation'}")
    assert "resuming after round 1" in resumed.stdout
    assert "round 1/2" not in resumed.stdout and "round 2/2: held-out clean accuracy" in resumed.stdout
    return root, data, first, second


def test_no_identity_name_leaves_a_client_or_the_server(inproc):
    """Finding 5: every round's fit config carried all training identity names to every client."""
    root, data, first, second = inproc
    names = sorted(p.name for p in data.iterdir())
    assert len(names) == 9
    crossed = [p for t in (first[0], second[0]) for p in t.sent + t.received]
    assert {kind for kind, _, _ in crossed} == {"query.register", "train", "evaluate"}
    for kind, node, payload in crossed:
        text = json.dumps({**payload.config, **payload.metrics}, default=str)
        blobs = b"".join(np.ascontiguousarray(a).tobytes() for a in [*payload.arrays, *payload.masks.values()])
        for name in names:
            assert name not in text and name.encode() not in blobs, (kind, node, name)
    # a client learns only its own rows of the head
    trains = [p for kind, _, p in first[0].sent if kind == "train"]
    rows = [proto.decode_rows(p.config["rows"]) for p in trains]
    assert all(0 < len(r) < 7 for r in rows) and not set(rows[0]) & set(rows[1])


def test_in_process_federation_is_the_simulation(inproc):
    """The server loop with clients that see only their messages computes what the simulation
    computes (same function per client, same aggregation), through a stop and a resume."""
    root, _, first, second = inproc
    assert any("resuming after round 1" in line for line in second[1])
    for r in (1, 2):
        federated, _ = load_global(root / "server", r)
        simulated, _ = load_global(root / "simulation", r)
        assert tree_max_diff(federated.variables, simulated.variables) < 1e-6, r
    assert_same_client_evaluations(root / "server", root / "simulation")
    for name in ("rounds.jsonl",):
        fed_lines = [json.loads(x) for x in (root / "server" / name).read_text().splitlines()]
        sim_lines = [json.loads(x) for x in (root / "simulation" / name).read_text().splitlines()]
        assert [e["masked"] for e in fed_lines] == [e["masked"] for e in sim_lines]


@pytest.mark.slow
def test_flower_one_command_is_the_simulation(inproc, tmp_path):
    """`--engine=flower` (--role=all: a SuperLink, 2 SuperNodes and `flwr run` on loopback, Flower's
    current runtime: finding 6) computes the simulation's run: the same global models after each
    round and the same clients' evaluations, FedBN and client momentum carried between rounds by
    the clients' own workdirs. Nothing prints a deprecation warning."""
    root, data, _, _ = inproc
    workdir = tmp_path / "flower"
    result = federate("--engine=flower", f"--data={data}", f"--mask={root / 'mask.npy'}",
                      f"--federation_key={root / 'federation.key'}", f"--workdir={workdir}")
    no_deprecation(result.stdout, result.stderr, *(p.read_text() for p in workdir.glob("client_*.log")))
    assert [e["round"] for e in rounds(workdir)] == [1, 2]
    for r in (1, 2):
        flower, _ = load_global(workdir, r)
        simulated, _ = load_global(root / "simulation", r)
        assert tree_max_diff(flower.variables, simulated.variables) < FLOWER_AGREEMENT, r
    assert_same_client_evaluations(workdir, root / "simulation")


def test_a_failing_client_is_named_and_the_rest_proceed_only_if_allowed(inproc, tmp_path):
    """Finding 3 (the server hung after a client failed, without saying why)."""
    _, data, _, _ = inproc
    key = tmp_path / "k"
    key.write_bytes(b"0123456789abcdef")
    broken = {11: RuntimeError("out of memory on the client's GPU")}
    fed = dataclasses.replace(INPROC_FED, rounds=1)
    with pytest.raises(FederationError, match=r"round 1: 1 client\(s\) answered, the run needs 2 \(--min_clients\); "
                                              r"failed: client 1 \(node 11\): out of memory on the client's GPU"):
        inproc_run(tmp_path / "strict", data, key, broken=broken, fed=fed)
    assert "failed" in (tmp_path / "strict" / "server" / ServerJob.STATUS).read_text()
    _, logs, result = inproc_run(tmp_path / "lenient", data, key, broken=broken, fed=fed,
                                 options=ServerOptions(min_clients=1))
    assert result["round"] == 1
    assert any("round 1: proceeding with 1 client(s)" in line and "out of memory" in line for line in logs)
    entry = json.loads((tmp_path / "lenient" / "server" / "rounds.jsonl").read_text().splitlines()[-1])
    assert entry["failed_clients"] == {"client 1 (node 11)": "out of memory on the client's GPU"}


def test_a_client_pinned_to_another_mask_refuses_to_register(inproc, tmp_path):
    _, data, _, _ = inproc
    key = tmp_path / "k"
    key.write_bytes(b"0123456789abcdef")
    ones = tmp_path / "ones.npy"
    np.save(ones, np.ones((16, 16), np.float32))
    transport = LocalTransport({1: NodeSettings(workdir=str(tmp_path / "c0"), data=str(data), partition=0,
                                                federation_key=str(key), mask=str(ones)),
                                2: NodeSettings(workdir=str(tmp_path / "c1"), data=str(data), partition=1,
                                                federation_key=str(key))})
    job = ServerJob(config=dataclasses.replace(INPROC, data=str(data)).to_json(),
                    federated=dataclasses.asdict(dataclasses.replace(INPROC_FED, rounds=1)),
                    workdir=str(tmp_path / "server"))
    with pytest.raises(FederationError, match="registration: 1 client.*client 0 refuses the run: it accepts only "
                                              "the mask given by its --mask.*random level masks"):
        run_server_job(job, transport, log=lambda _: None)


def test_fedavg_weights_each_clients_training_step_by_its_examples(inproc):
    """The simulation's first round (clients of 16 and 12 images): every shared leaf of the saved
    global model is the example-weighted mean of each client's `train_step` from the initial model
    (FSM under the run's mask, the client's own key and batch), computed here client by client. A
    client that skips its step or uses another learning rate, key, mask or batch, or a weighting by
    anything but example counts, moves whole leaves. (FedBN: the BatchNorm leaves are the clients'
    own, tested on a small net above.)"""
    simulated = inproc[0] / "simulation"
    record = json.loads((simulated / "run.json").read_text())
    config, fed = TrainConfig.from_json(record["config"]), FederatedConfig(**record["federated"])
    saved, _ = load_global(simulated, 1)
    sim = S.prepare(config, fed, federation_key=str(inproc[0] / "federation.key"))  # the head's row order
    counts = np.array([len(p) for p in sim.parts], np.float64)
    assert counts.tolist() == [16.0, 12.0]  # 7 training identities of 4 images: 4 and 3 per client
    train_config = fed.train_config(config)
    step = jax.jit(functools.partial(train_step, use_fsm=True, schedule=lr_schedule(train_config)))
    start = sim.server.initial_global(sim.num_classes)
    model = sim.server.model(sim.num_classes)
    updates = []
    for client in range(fed.clients):
        batch = jax.tree.map(lambda x: x[0], D.round_batches(sim.client_part(client), config, fed, client, 0))
        state = TrainState.create(apply_fn=model.apply, params=start["params"],
                                  batch_stats=start["batch_stats"], tx=make_optimizer(train_config))
        new, _ = step(state, batch, sim.server.masks, jax.random.fold_in(sim.server.step_key, client))
        updates.append({"params": new.params, "batch_stats": new.batch_stats})
    flags = fedbn.local_flags(start, fed.bn)
    shared = [fedbn.shared_leaves(u, flags) for u in updates]
    weighted = [(counts[0] * np.asarray(a, np.float64) + counts[1] * np.asarray(b)) / 28 for a, b in zip(*shared)]
    unweighted = [(np.asarray(a, np.float64) + np.asarray(b)) / 2 for a, b in zip(*shared)]
    error = tree_max_diff(fedbn.shared_leaves(saved.variables, flags), weighted)
    assert error < 1e-5  # measured 2.4e-6 (float32 rounding of two compiled programs), spread 0.84
    assert tree_max_diff(weighted, unweighted) > 100 * max(error, 1e-6)  # the weighting is visible


def test_workdir_refuses_other_federated_settings(tmp_path):
    from jaxdesens.federation.server import claim

    config = TrainConfig(model="resnet", width=0.125, image_size=16, batch_size=4, synthetic_identities=8,
                         synthetic_images_per_identity=4, holdout=0.25)
    sim = S.prepare(config, FederatedConfig(clients=2, rounds=2, local_steps=2))
    claim(RunDirectory(tmp_path), sim.server, "simulation", sim.num_classes)
    claim(RunDirectory(tmp_path), sim.server, "simulation", sim.num_classes)
    other = dataclasses.replace(sim.server, fed=FederatedConfig(clients=2, rounds=2, local_steps=2, bn="local"))
    with pytest.raises(ResumeError, match="'bn': 'average'"):
        claim(RunDirectory(tmp_path), other, "simulation", sim.num_classes)
    with pytest.raises(ResumeError, match="engine: 'simulation' -> 'flower'"):
        claim(RunDirectory(tmp_path), sim.server, "flower", sim.num_classes)


def rounds(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "rounds.jsonl").read_text().splitlines()]


def test_simulation_reports_every_round(inproc):
    simulated = inproc[0] / "simulation"
    entries = rounds(simulated)
    assert [e["round"] for e in entries] == [1, 2]
    record = json.loads((simulated / "run.json").read_text())
    config = TrainConfig.from_json(record["config"])
    sim = S.prepare(config, FederatedConfig(**record["federated"]))
    held_out, mask = sim.server.held_out, np.asarray(sim.server.masks.fixed)
    pairs = generate_pairs(held_out.labels, None, seed=0, n_folds=10)
    for entry in entries:
        assert entry["engine"] == "simulation" and entry["step"] == entry["round"]
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
    assert record["federated"]["clients"] == 2 and record["config"]["steps"] == 2
    assert json.loads((simulated / "eval.json").read_text())["round"] == 2
    clients = [json.loads(x) for x in (simulated / "clients.jsonl").read_text().splitlines()]
    assert [(c["round"], c["client"]) for c in clients] == [(r, f"client {i}") for r in range(3) for i in range(2)]
    # every command that takes --checkpoint reads the last round's global model
    last, round_index = load_global(simulated)
    assert round_index == 2 and tree_max_diff(load_recognizer(simulated).variables, last.variables) == 0
