"""Training: schedule, optimiser, resumable workdir, sharding equivalence, kill-and-resume, AT&T."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import PYTHON, ROOT, subprocess_env

from jaxdesens.config import TrainConfig
from jaxdesens.recognizer import load_recognizer
from jaxdesens.state import lr_schedule, make_optimizer
from jaxdesens.train import train_and_evaluate
from jaxdesens.workdir import ResumeError, RunDirectory

TINY = ["--width=0.125", "--depth=18", "--image_size=32", "--batch_size=16", "--synthetic_identities=12",
        "--synthetic_images_per_identity=6", "--holdout=0.34", "--level_bank_size=16", "--progress=false"]


def run_cli(workdir: Path, *flags: str, devices: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    command = [PYTHON, str(ROOT / "launch" / "train.py"), f"--workdir={workdir}", *TINY, *flags]
    result = subprocess.run(command, env=subprocess_env(devices), capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stdout}\n{result.stderr}")
    return result


def losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_paper_schedule_divides_by_ten_at_50_70_90_percent():
    schedule = lr_schedule(TrainConfig(steps=100, lr=0.01))
    values = [float(schedule(s)) for s in (0, 49, 50, 69, 70, 89, 90, 99)]
    np.testing.assert_allclose(values, [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-5)


def test_weight_decay_applies_to_kernels_only():
    params = {"conv": {"kernel": np.ones(3, np.float32)}, "bn": {"scale": np.ones(3, np.float32)}}
    optimizer = make_optimizer(TrainConfig(weight_decay=0.5, lr=1.0, momentum=0.0))
    updates, _ = optimizer.update(jax.tree.map(np.zeros_like, params), optimizer.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.5)
    np.testing.assert_allclose(updates["bn"]["scale"], 0.0)


def test_workdir_refuses_a_different_run(tmp_path):
    run = RunDirectory(tmp_path)
    run.claim(TrainConfig(steps=10), data_fingerprint="abc", mask_fingerprint=None, num_classes=3)
    RunDirectory(tmp_path).claim(TrainConfig(steps=10, log_every=3), data_fingerprint="abc", mask_fingerprint=None,
                                 num_classes=3)
    with pytest.raises(ResumeError, match=r"steps: 10 -> 20"):
        RunDirectory(tmp_path).claim(TrainConfig(steps=20), data_fingerprint="abc", mask_fingerprint=None,
                                     num_classes=3)
    with pytest.raises(ResumeError, match=r"data_fingerprint: 'abc' -> 'xyz'"):
        RunDirectory(tmp_path).claim(TrainConfig(steps=10), data_fingerprint="xyz", mask_fingerprint=None,
                                     num_classes=3)


def test_cli_reports_bad_input_clearly(tmp_path):
    bad_model = run_cli(tmp_path / "a", "--model=vgg", check=False)
    assert bad_model.returncode == 2 and "--model must be one of resnet|mask|fsm" in bad_model.stderr
    missing = run_cli(tmp_path / "b", f"--data={tmp_path / 'nowhere'}", check=False)
    assert missing.returncode == 2 and str(tmp_path / "nowhere") in missing.stderr
    bad_mask = run_cli(tmp_path / "c", "--model=fsm", f"--mask={tmp_path / 'mask.png'}", check=False)
    assert bad_mask.returncode == 2 and str(tmp_path / "mask.png") in bad_mask.stderr
    uneven = run_cli(tmp_path / "d", "--batch_size=15", devices=2, check=False)
    assert uneven.returncode == 2 and "multiple of the device count 2" in uneven.stderr


@pytest.mark.slow
def test_four_devices_give_the_one_device_loss_curve(tmp_path):
    flags = ["--model=fsm", "--steps=6", "--log_every=1"]
    run_cli(tmp_path / "one", *flags, devices=1)
    run_cli(tmp_path / "four", *flags, devices=4)
    np.testing.assert_allclose(losses(tmp_path / "four"), losses(tmp_path / "one"), rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    flags = ["--model=mask", "--steps=40", "--checkpoint_every=5", "--log_every=5", "--keep_checkpoints=2"]
    run_cli(tmp_path / "straight", *flags)
    killed = tmp_path / "killed"
    command = [PYTHON, str(ROOT / "launch" / "train.py"), f"--workdir={killed}", *TINY, *flags]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "10").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 40, f"the run was not interrupted mid-training: {steps}"
    resumed = run_cli(killed, *flags)
    assert "resuming from step" in resumed.stdout
    a, b = load_recognizer(tmp_path / "straight"), load_recognizer(killed)
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    logged_steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged_steps == list(range(5, 41, 5))
    straight_eval = json.loads((tmp_path / "straight" / "eval.json").read_text())
    assert json.loads((killed / "eval.json").read_text()) == straight_eval


@pytest.mark.slow
@pytest.mark.compute_bound
def test_short_att_training_beats_chance_on_held_out_identities(att_dir, tmp_path):
    config = TrainConfig(model="resnet", data=str(att_dir), steps=150, width=0.25, image_size=48, batch_size=50,
                         log_every=50, checkpoint_every=150)
    result = train_and_evaluate(config, tmp_path, progress=False, log=lambda _: None)
    clean = result.evaluation["clean"]
    assert result.evaluation["identities"] == 10
    assert clean["accuracy"] > 0.7, clean
    assert clean["auc"] > 0.75, clean
    assert (tmp_path / "checkpoints" / "150").exists()
    # the evaluation batch is a resumable setting: the rerun only evaluates, in batches of 13
    again = train_and_evaluate(dataclasses.replace(config, eval_batch_size=13), tmp_path, progress=False,
                               log=lambda _: None)
    assert again.evaluation["clean"]["accuracy"] == clean["accuracy"]
    np.testing.assert_allclose(again.evaluation["clean"]["auc"], clean["auc"], atol=1e-6)
