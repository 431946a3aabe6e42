"""Multi-host training (finding 9: `jax.distributed` existed in the code but nothing ran it): two
CPU processes of one device each, joined through `JAX_COORDINATOR_ADDRESS` on loopback, train
exactly as one process with two devices (loss curve and parameters)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jax
import numpy as np
from helpers import PYTHON, ROOT, subprocess_env

from jaxdesens.federation.flower_deploy import free_port
from jaxdesens.recognizer import load_recognizer

TRAIN = [str(ROOT / "launch" / "train.py"), "--model=fsm", "--width=0.125", "--image_size=16", "--batch_size=8",
         "--steps=4", "--log_every=1", "--checkpoint_every=2", "--synthetic_identities=8",
         "--synthetic_images_per_identity=4", "--holdout=2", "--lr=0.1", "--progress=false", "--eval_batch_size=8"]


def losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_as_one_process_with_two_devices(tmp_path):
    single = subprocess.run([PYTHON, *TRAIN, f"--workdir={tmp_path / 'single'}"], env=subprocess_env(2),
                            capture_output=True, text=True, timeout=900, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "on 2 cpu device(s)" in single.stdout

    port = free_port()
    processes = []
    for rank in range(2):
        env = {**subprocess_env(1), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(rank)}
        processes.append(subprocess.Popen([PYTHON, *TRAIN, f"--workdir={tmp_path / 'multi'}"], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=900) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "on 2 cpu device(s)" in out  # each process sees the job's two devices

    expected, got = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert len(got) == 4 and len(set(np.round(got, 3))) > 1  # one line per step, written once, training moves
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    a, b = load_recognizer(tmp_path / "single"), load_recognizer(tmp_path / "multi")
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    held_out = [json.loads((tmp_path / w / "eval.json").read_text())["masked"]["accuracy"] for w in ("single", "multi")]
    assert held_out[0] == held_out[1]
