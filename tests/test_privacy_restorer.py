"""The learned restoration attacker: composition, masks, resumable training, benchmark."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from helpers import PYTHON, ROOT, subprocess_env

from jaxdesens.data.errors import DataError
from jaxdesens.privacy.masks import fixed_freeform_mask, mask_bank
from jaxdesens.privacy.restorer_train import (
    Restorer,
    RestorerConfig,
    build_net,
    create_state,
    load_restorer,
    sample_batch,
)

TINY = ["--image_size=32", "--width=4", "--batch_size=4", "--synthetic_identities=8",
        "--synthetic_images_per_identity=4", "--freeform_masks=16", "--level_masks=2", "--progress=false"]


def test_restoration_keeps_every_visible_pixel():
    config = RestorerConfig(image_size=16, width=4)
    net = build_net(config)
    restorer = Restorer(net, create_state(config, net, jax.random.key(0)).params, config)
    images = np.random.default_rng(0).uniform(size=(3, 16, 16, 3)).astype(np.float32)
    mask = np.zeros((16, 16), np.float32)
    mask[:, :6] = 1
    restored = restorer.restore(images * mask[..., None], mask, batch_size=2)
    np.testing.assert_array_equal(restored[:, :, :6], images[:, :, :6])
    assert np.all(restored[:, :, 6:] > 0) and np.all(restored <= 1)  # holes are filled, not left black
    with pytest.raises(ValueError, match=r"\(16, 16, 3\)"):
        restorer.restore(np.zeros((1, 24, 24, 3)), np.ones((24, 24)))


def test_config_refuses_sizes_the_network_cannot_halve_three_times():
    with pytest.raises(ValueError, match="multiple of 8"):
        RestorerConfig(image_size=60)
    with pytest.raises(ValueError, match="identities"):
        RestorerConfig(identities="kept")


def test_mask_bank_and_sampling_cover_every_group_including_the_export_mask():
    export = np.zeros((16, 16), np.float32)
    export[4:12, 4:12] = 1
    bank, offsets, sizes, groups = mask_bank(jax.random.key(0), 16, 8, 2, [export])
    assert groups == ["freeform-visible", "hole-ratio-levels", "export-mask"]
    assert sizes.tolist() == [8, 12, 1] and offsets.tolist() == [0, 8, 20] and bank.shape == (21, 16, 16)
    hidden = 1 - bank.reshape(21, -1).mean(1)
    assert hidden[8:20].max() <= 0.6 < hidden[:8].mean()  # holes-as-strokes vs strokes-as-visible
    images = np.zeros((5, 16, 16, 3), np.uint8)
    x, masks = sample_batch(jax.random.key(1), images, bank, offsets, sizes, 64)
    drawn = {int(np.flatnonzero((bank == np.asarray(m[..., 0])).all(axis=(1, 2)))[0]) for m in masks}
    assert 20 in drawn and drawn & set(range(8)) and drawn & set(range(8, 20))
    again = sample_batch(jax.random.key(1), images, bank, offsets, sizes, 64)[1]
    np.testing.assert_array_equal(masks, again)


def test_fixed_freeform_mask_hides_the_asked_share_reproducibly():
    mask = fixed_freeform_mask(48, 0.7, seed=0)
    assert abs((1 - mask.mean()) - 0.7) <= 0.02 and set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(mask, fixed_freeform_mask(48, 0.7, seed=0))


def test_load_restorer_refuses_a_folder_that_is_not_a_restorer(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(DataError, match="not a restorer workdir"):
        load_restorer(tmp_path)


def _run(workdir, *flags):
    command = [PYTHON, str(ROOT / "launch" / "restore.py"), f"--workdir={workdir}", *TINY, *flags]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_killed_restorer_training_resumes_to_the_same_parameters(tmp_path):
    flags = ["--steps=60", "--checkpoint_every=10", "--log_every=10"]
    _run(tmp_path / "straight", *flags)
    killed = tmp_path / "killed"
    command = [PYTHON, str(ROOT / "launch" / "restore.py"), f"--workdir={killed}", *TINY, *flags]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "20").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 60, f"the run was not interrupted mid-training: {steps}"
    assert "resuming from step" in _run(killed, *flags).stdout
    a, b = load_restorer(tmp_path / "straight"), load_restorer(killed)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    logged = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(10, 61, 10))
    assert logged[-1]["hole_l1"] < 0.8 * logged[0]["hole_l1"]  # it learns to fill holes
    different = subprocess.run([PYTHON, str(ROOT / "launch" / "restore.py"), f"--workdir={killed}", *TINY,
                                "--steps=60", "--width=8"], env=subprocess_env(), capture_output=True, text=True)
    assert different.returncode == 2 and "width: 4 -> 8" in different.stderr


@pytest.mark.slow
def test_restorer_benchmark_smoke(tmp_path):
    out = tmp_path / "restorer.json"
    result = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "restorer_throughput.py"), "--quick", "--json",
                             str(out)], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"restorer_train_step", "restorer_inference"}
    assert all(row["value"] > 0 and row["unit"] == "images/s" for row in rows.values())
