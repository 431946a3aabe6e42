"""Flower's Deployment Runtime on loopback, with separate processes as on separate machines: the
README's multi-machine recipe as written (a server holding only held-out identities, clients with
their own folders started before the server, a server restart that resumes), and faults (a
client refusing the server's mask, a client dying mid-run) that end with the client named."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import flwr  # noqa: F401  (a declared test dependency: missing, these tests fail rather than skip)
import numpy as np
import pytest
from helpers import PYTHON, ROOT, subprocess_env

from jaxdesens.federation.flower_deploy import free_port

FEDERATE = str(ROOT / "launch" / "federated.py")
TRAINING = ["--model=fsm", "--width=0.125", "--image_size=32", "--batch_size=16", "--local_steps=2", "--lr=0.05",
            "--eval_images=16"]


def no_deprecation(*texts: str) -> None:
    for text in texts:
        assert not re.search("deprecat", text, re.IGNORECASE), text[-3000:]


def folder_of(root: Path, att_dir: Path, people: range) -> Path:
    """An identity folder of AT&T people s<i> (links, as a machine's own copy would be)."""
    root.mkdir(parents=True)
    for i in people:
        (root / f"s{i}").symlink_to(att_dir / f"s{i}")
    return root


@pytest.fixture(scope="module")
def deployment(att_dir, tmp_path_factory) -> dict[str, Path]:
    """What each machine holds: the server its held-out people and the mask it searched; each
    client its own people and the federation key (shared by the clients only)."""
    root = tmp_path_factory.mktemp("deployment")
    mask = np.ones((32, 32), np.float32)
    mask[6:16, 3:29] = 0
    np.save(root / "mask.npy", mask)
    np.save(root / "ones.npy", np.ones((32, 32), np.float32))
    (root / "federation.key").write_bytes(os.urandom(32))
    return {"root": root, "mask": root / "mask.npy", "ones": root / "ones.npy", "key": root / "federation.key",
            "server_data": folder_of(root / "server_people", att_dir, range(31, 41)),
            "a": folder_of(root / "people_a", att_dir, range(1, 11)),
            "b": folder_of(root / "people_b", att_dir, range(11, 21)),
            "c": folder_of(root / "people_c", att_dir, range(21, 31))}


def start(args: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen([PYTHON, FEDERATE, *args], stdout=out, stderr=subprocess.STDOUT,
                                env=subprocess_env(1))


def client(d: dict[str, Path], name: str, port: int, workdir: Path, *extra: str) -> subprocess.Popen:
    """The README's client command."""
    return start(["--engine=flower", "--role=client", f"--server_address=127.0.0.1:{port}", f"--data={d[name]}",
                  f"--federation_key={d['key']}", f"--workdir={workdir}", *extra], workdir.parent / f"{name}.out")


def server(d: dict[str, Path], port: int, workdir: Path, *extra: str,
           timeout: int = 900) -> subprocess.CompletedProcess:
    """The README's server command."""
    command = [PYTHON, FEDERATE, "--engine=flower", "--role=server", f"--server_address=0.0.0.0:{port}",
               f"--eval_data={d['server_data']}", f"--mask={d['mask']}", *TRAINING, f"--workdir={workdir}", *extra]
    return subprocess.run(command, env=subprocess_env(1), capture_output=True, text=True, timeout=timeout,
                          check=False)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()  # the client command stops its SuperNode on SIGTERM
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def rounds(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_multi_machine_recipe_as_written(deployment, tmp_path):
    """Finding 4: a server holding only held-out identities re-split them and its clients failed;
    a client started before the server crashed at once. Here the clients start first, the server
    stops after round 1 and a new server process resumes with the same clients."""
    d, port = deployment, free_port()
    clients = [client(d, "a", port, tmp_path / "a" / "work", f"--mask={d['mask']}"),
               client(d, "b", port, tmp_path / "b" / "work")]
    try:
        time.sleep(5)  # nothing listens yet: the clients keep trying
        assert all(c.poll() is None for c in clients)
        first = server(d, port, tmp_path / "server", "--clients=2", "--rounds=2", "--stop_after=1")
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        assert "registered client people_a" in first.stdout and "100 images of 10 identities" in first.stdout
        assert [r["round"] for r in rounds(tmp_path / "server")] == [1]
        assert all(c.poll() is None for c in clients)  # the run is not over: they wait for the server
        second = server(d, port, tmp_path / "server", "--clients=2", "--rounds=2")
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
        assert "resuming after round 1" in second.stdout
        codes = [c.wait(timeout=120) for c in clients]
        outputs = [(tmp_path / n / f"{n}.out").read_text() for n in "ab"]
        assert codes == [0, 0], outputs
    finally:
        for c in clients:
            stop(c)
    entries = rounds(tmp_path / "server")
    assert [e["round"] for e in entries] == [1, 2] and all("masked" in e for e in entries)
    assert json.loads((tmp_path / "server" / "run.json").read_text())["num_classes"] == 20  # the clients' people
    evaluations = [json.loads(x) for x in (tmp_path / "server" / "clients.jsonl").read_text().splitlines()]
    assert sorted((e["round"], e["client"]) for e in evaluations) == [(r, f"client people_{n}") for r in range(3)
                                                                      for n in "ab"]
    logs = [(tmp_path / n / "work" / "supernode.log").read_text() for n in "ab"]
    assert all("round 2 loss" in log for log in logs)
    no_deprecation(first.stdout, first.stderr, second.stdout, second.stderr, *outputs, *logs)


@pytest.mark.slow
def test_a_refused_client_is_named_and_a_dead_one_ends_the_round(deployment, tmp_path):
    """Findings 2 and 3: a client started with an all-ones mask joined and trained unmasked; a
    dead client left the server hanging. Here 3 clients start, one accepts only an all-ones mask
    and is refused (the run proceeds, --min_clients=2), one dies after round 1: round 2 ends the
    run within a bounded time, naming it."""
    d, port = deployment, free_port()
    workdir = tmp_path / "server"
    clients = {"a": client(d, "a", port, tmp_path / "a" / "work"),
               "b": client(d, "b", port, tmp_path / "b" / "work"),
               "c": client(d, "c", port, tmp_path / "c" / "work", f"--mask={d['ones']}")}
    try:
        run = subprocess.Popen([PYTHON, FEDERATE, "--engine=flower", "--role=server",
                                f"--server_address=0.0.0.0:{port}", f"--eval_data={d['server_data']}",
                                f"--mask={d['mask']}", *TRAINING,
                                f"--workdir={workdir}", "--clients=3", "--min_clients=2", "--rounds=3"],
                               env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 900
        while not (workdir / "rounds.jsonl").exists() or not rounds(workdir):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(1)
        assert clients["c"].wait(timeout=60) == 1  # the refused client stops, saying why
        refused = (tmp_path / "c" / "c.out").read_text()
        assert "client people_c refuses the run: it accepts only the mask given by its --mask" in refused
        died = time.monotonic()
        clients["b"].send_signal(signal.SIGKILL)  # the machine is gone: its SuperNode with it
        node = tmp_path / "b" / "work" / "supernode.pid"
        os.killpg(int(node.read_text()), signal.SIGKILL)
        out, err = run.communicate(timeout=600)
        ended = time.monotonic() - died
    finally:
        for c in clients.values():
            stop(c)
    assert run.returncode == 1, out[-3000:] + err[-3000:]
    assert "registration: proceeding with 2 client(s) (--min_clients=2); failed: client people_c" in out
    assert re.search(r"round 2: 1 client\(s\) answered, the run needs 2 \(--min_clients\); failed: client people_b "
                     r"\(node \d+\): .*(Node Unavailable|no reply)", err), err[-3000:]
    assert ended < 240, ended
    assert [r["round"] for r in rounds(workdir)] == [1]
    assert json.loads((workdir / "federation-status.json").read_text())["state"] == "failed"
    no_deprecation(out, err)
