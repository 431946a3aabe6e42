"""The one-command pipeline: every stage runs, the report has every section and its numbers are the
masks' hidden shares and scikit-image's dSSIM, a rerun skips; presets derive TrainConfig's defaults."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from jaxdesens.data import load_dataset
from jaxdesens.jobs import pipeline
from jaxdesens.jobs.pipeline import PipelineJob, Preset, run_pipeline
from jaxdesens.masks import load_mask


def hidden_share(mask_png) -> float:
    pixels = np.asarray(Image.open(mask_png))
    return np.count_nonzero(pixels == 0) / pixels.size


def reference_dssim(images: np.ndarray, mask: np.ndarray) -> float:
    x = images.astype(np.float64) / 255.0
    return float(np.mean([1 - structural_similarity(a, a * mask[:, :, None], gaussian_weights=True, sigma=1.5,
                                                    use_sample_covariance=False, data_range=1.0, channel_axis=-1)
                          for a in x]))


# At 32 px layer3 is a 2x2 map, so the template is a broad blob: T=0.9 keeps about 40% of it.
TINY = Preset(train=dataclasses.replace(pipeline.CPU_TRAIN, image_size=32, width=0.125, batch_size=32, steps=30,
                                         synthetic_identities=16, synthetic_images_per_identity=6),
              search_n=32, K=8, T=0.9, batch_images=8, min_ratio=0.3, repeats=1, baseline_n=8, attack_images=8,
              attacks="telea", fsm_points=(2, 3), thresholds=(0.6,))


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setitem(pipeline.PRESETS, "tiny", TINY)
    job = PipelineJob(workdir=str(tmp_path / "run"), preset="tiny")
    messages: list[str] = []
    report = run_pipeline(job, progress=False, log=messages.append)
    root = tmp_path / "run"
    for path in ("owner/train", "owner/test", "owner/owner.key", "clean/eval.json", "search/mask.png",
                 "export/manifest.json", "resnet-mask/eval.json", "resnet-mask-levels/eval.json", "fsm/eval.json",
                 "fsm_l2/eval.json", "no_ebp/mask.png", "threshold_T0.6/fsm/eval.json", "evaluate/report.md"):
        assert (root / path).exists(), path
    assert not list((root / "export").rglob("*.key"))  # the owner's key never enters the export
    text = (root / "report.md").read_text()
    for heading in ("Hand-off export", "without EBP", "Table 7", "Table 8", "Table 1", "Table 3", "Table 4",
                    "Table 5", "Restoration attacks"):
        assert heading in text, heading
    assert report["split"]["test_identities"] == 4 and report["split"]["train_identities"] == 12
    assert set(report["ablations"]["fsm_points"]) == {"layer2", "layer3"}
    # Every reported ratio is the hidden share of the mask file, counted here; dSSIM is scikit-image's.
    share = hidden_share(root / "search" / "mask.png")
    stored = json.loads((root / "report.json").read_text())
    assert stored["search"]["ratio"] == pytest.approx(share) and share >= 0.3
    assert report["privacy"]["mask_ratio"] == pytest.approx(share, abs=1e-6)
    assert (root / "export" / "mask.png").read_bytes() == (root / "search" / "mask.png").read_bytes()
    with_ebp = report["ablations"]["ebp"]["with_ebp"]
    assert with_ebp["ratio"] == pytest.approx(share)
    test_faces = load_dataset(root / "owner" / "test", 32).images
    assert with_ebp["dssim"] == pytest.approx(reference_dssim(test_faces, load_mask(root / "search" / "mask.png")),
                                              abs=1e-5)
    threshold_mask = root / "threshold_T0.6" / "search" / "mask.png"
    row = report["ablations"]["thresholds"]["0.6"]
    assert row["ratio"] == pytest.approx(hidden_share(threshold_mask))
    assert row["dssim"] == pytest.approx(reference_dssim(test_faces, load_mask(threshold_mask)), abs=1e-5)
    evaluation = json.loads((root / "evaluate" / "results.json").read_text())
    assert evaluation["table3"]["ratio"] == pytest.approx(share)
    # the audit: the evaluation's, on the export's people, drawn into the workdir; dlib (a declared test
    # dependency) finds no face in these small synthetic faces, and the report says so
    audit = report["privacy_audit"]
    assert [p["name"] for p in audit["points"]] == ["clean", "mask:searched", "blur:3", "blur:5", "mosaic:2",
                                                   "mosaic:5"]
    assert audit["attackers"] == ["dlib", "recipient:resnet-mask-levels", "recipient:resnet-mask",
                                  "recipient:resnet-fsm"]
    assert audit["probes"] == 8 and audit["people"] == evaluation["audit"]["people"] >= 8
    assert (root / "privacy_utility.png").stat().st_size > 1000 and "## Who can name the people" in text
    assert any("dlib found a face in only" in w for w in audit["warnings"]) == (
        evaluation["audit"]["audit"]["attackers"]["dlib"]["gallery_faces_detected"] < audit["people"])
    assert json.loads((root / "export" / "privacy_report.json").read_text())["reidentification"]["run"] is False

    messages.clear()
    again = run_pipeline(job, progress=False, log=messages.append)
    assert sum("finished earlier" in m for m in messages) >= 8
    assert again["ablations"] == report["ablations"]


def test_pipeline_refuses_a_workdir_inside_the_data(tmp_path):
    (tmp_path / "faces").mkdir()
    with pytest.raises(ValueError, match="inside --data"):
        run_pipeline(PipelineJob(data=str(tmp_path / "faces"), workdir=str(tmp_path / "faces" / "run")))
    with pytest.raises(ValueError, match="--preset"):
        PipelineJob(preset="huge")
    assert dataclasses.asdict(pipeline.PRESETS["cpu"])["min_ratio"] == 0.6


def test_presets_take_every_training_setting_from_train_config(tmp_path):
    from jaxdesens.config import TrainConfig

    preset_fields = {f.name for f in dataclasses.fields(Preset)}
    assert not preset_fields & {f.name for f in dataclasses.fields(TrainConfig)}  # nothing re-declared
    for name, preset in pipeline.PRESETS.items():
        job = PipelineJob(workdir=str(tmp_path), preset=name)
        config = pipeline.model_config(job, "fsm", tmp_path / "export", fsm_after=2)
        assert (config.model, config.data, config.fsm_after, config.seed) == ("fsm", str(tmp_path / "export"), 2, 0)
        for field in ("depth", "width", "image_size", "batch_size", "steps", "lr", "bf16", "holdout", "momentum",
                      "weight_decay", "channels", "flip"):
            assert getattr(config, field) == getattr(preset.train, field), (name, field)
    # what the presets do not override is TrainConfig's default
    assert pipeline.PRESETS["cpu"].train.momentum == TrainConfig().momentum
    assert pipeline.PRESETS["gpu"].train.depth == 34 and pipeline.PRESETS["cpu-full"].train.steps == 400
