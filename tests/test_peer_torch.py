"""The PyTorch peer benchmark (`benchmarks/peer_torch.py`): a CI-sized run on the CPU in both memory
layouts with the faster one marked as the peer, the bounded compile child, and the in-file ResNet
fallback against torchvision's documented parameter counts.

torch is a test dependency, so these tests import it and fail (not skip) where it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "peer_torch.py"


def _peer():
    import torch  # noqa: F401  (a clear ImportError first when torch is missing)

    spec = importlib.util.spec_from_file_location("peer_torch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *flags: str) -> dict:
    import torch  # noqa: F401

    out = tmp_path / "peer.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), "--device", "cpu", *flags],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| measurement | variant | layout | value | unit |" in proc.stdout
    return json.loads(out.read_text())


def _parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_quick_cpu_run_writes_positive_numbers(tmp_path):
    report = _run(tmp_path, "--quick")
    import torch

    assert report["torch"] == torch.__version__
    assert report["device"].startswith("cpu") and report["cuda"] == torch.version.cuda
    settings = report["settings"]
    assert (settings["depth"], settings["image_size"], settings["batch"], settings["scoring_masks"]) == (18, 32, 4, [2])
    assert settings["dtype"] == "float32" and settings["compile"] is False
    assert report["complete"] is True and report["skipped"] == []
    assert settings["layouts"] == ["contiguous", "channels_last"]  # the CPU peer measures both
    rows = {(r["name"], r["variant"], r.get("masks"), r["layout"]): r for r in report["results"]}
    measurements = (("inference", None), ("train_step", None), ("scoring", 2))
    assert set(rows) == {(n, "eager", m, layout) for n, m in measurements for layout in settings["layouts"]}
    for n, m in measurements:
        pair = [rows[(n, "eager", m, layout)] for layout in settings["layouts"]]
        assert [min(pair, key=lambda r: r["ms_per_call"])] == [r for r in pair if r["peer"]]
    for row in report["results"]:
        assert row["images_per_s"] > 0 and row["ms_per_call"] > 0
        assert len(row["window_ms"]) == settings["windows"] and all(t > 0 for t in row["window_ms"])
    scoring = rows[("scoring", "eager", 2, "channels_last")]
    assert scoring["masks_per_s"] > 0 and scoring["images_per_mask"] == settings["scoring_images"]
    assert scoring["images_per_s"] == pytest.approx(scoring["masks_per_s"] * settings["scoring_images"])


@pytest.mark.slow
def test_compile_child_is_bounded(tmp_path):
    """A compile that cannot finish in its time limit is killed and listed as skipped."""
    report = _run(tmp_path, "--quick", "--only", "inference", "--layouts", "contiguous", "--compile",
                  "--compile_timeout_s", "2")
    assert [(r["name"], r["variant"]) for r in report["results"]] == [("inference", "eager")]
    assert [(s["name"], s["variant"]) for s in report["skipped"]] == [("inference", "compile")]
    assert "killed after" in report["skipped"][0]["reason"]
    assert report["complete"] is False


def test_the_faster_layout_of_each_measurement_is_the_peer():
    rows = [{"name": "inference", "variant": "eager", "layout": "contiguous", "ms_per_call": 10.0},
            {"name": "inference", "variant": "eager", "layout": "channels_last", "ms_per_call": 8.0},
            {"name": "scoring", "variant": "eager", "masks": 8, "layout": "contiguous", "ms_per_call": 5.0},
            {"name": "scoring", "variant": "eager", "masks": 8, "layout": "channels_last", "ms_per_call": 6.0},
            {"name": "scoring", "variant": "eager", "masks": 64, "layout": "channels_last", "ms_per_call": 50.0}]
    _peer().mark_peers(rows)
    assert [r["peer"] for r in rows] == [False, True, True, False, True]


def test_fallback_resnet_matches_torchvision_parameter_counts():
    peer = _peer()
    # torchvision's documented counts for 1000 classes (resnet18 / resnet34 weight tables).
    assert _parameter_count(peer.build_resnet34(1000, prefer_torchvision=False)) == 21_797_672
    assert _parameter_count(peer.build_resnet(18, 1000, prefer_torchvision=False)[0]) == 11_689_512
    shapes = {k: tuple(v.shape) for k, v in peer.build_resnet34(8631, prefer_torchvision=False).state_dict().items()}
    # torchvision's module names, so state dicts load across the two.
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert shapes["layer3.5.bn2.running_var"] == (256,)
    assert "layer4.3.conv1.weight" not in shapes and shapes["layer4.2.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["fc.weight"] == (8631, 512)


def test_folded_batchnorm_matches_eval_model():
    import torch

    peer = _peer()
    torch.manual_seed(0)
    model, _ = peer.build_resnet(18, 10, prefer_torchvision=False)
    for module in model.modules():  # non-trivial statistics, so the fold is actually exercised
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    folded = peer.fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
