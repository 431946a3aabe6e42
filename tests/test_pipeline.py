"""The one-command pipeline: every stage runs, the report has every section, a rerun skips."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jaxdesens.jobs import pipeline
from jaxdesens.jobs.pipeline import PipelineJob, Preset, run_pipeline

TINY = Preset(image_size=32, width=0.125, batch_size=32, steps=30, synthetic_identities=16,
              synthetic_images_per_identity=6, search_n=32, K=8, T=0.6, batch_images=8, min_ratio=0.3, repeats=1,
              baseline_n=8, attack_images=8, attacks="telea", fsm_points=(2, 3), thresholds=(0.6,))


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
    assert json.loads((root / "report.json").read_text())["search"]["ratio"] >= 0.3

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
