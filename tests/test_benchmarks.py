"""Every benchmark runs end to end in CI-sized settings and writes its JSON."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import PYTHON, ROOT, subprocess_env


@pytest.mark.slow
@pytest.mark.parametrize("script,expected", [
    ("search_throughput.py", {"scoring", "generation", "forward", "ebp", "occlusion"}),
    ("train_throughput.py", {"train_step_resnet", "train_step_mask", "train_step_fsm", "embedding", "fsm_overhead"}),
    ("pipeline_throughput.py", {"decode_folder", "pipeline_memory", "pipeline_arrayrecord"}),
])
def test_benchmark_smoke(tmp_path, script, expected):
    out = tmp_path / "result.json"
    result = subprocess.run([PYTHON, str(ROOT / "benchmarks" / script), "--quick", "--json", str(out)],
                            env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    names = {row["name"] for row in report["results"]}
    assert expected <= names
    assert all(row["value"] > 0 for row in report["results"] if row["unit"] != "%")
    assert report["machine"]["platform"] == "cpu"
    assert "| measurement |" in result.stdout.splitlines()[-len(report["results"]) - 2]


def test_summary_combines_reports_and_ratios(tmp_path):
    rows = {"search": [{"name": "scoring", "value": 500.0, "unit": "masks/s"}],
            "search_s2d": [{"name": "scoring", "value": 600.0, "unit": "masks/s"}],  # the best variant counts
            "train": [{"name": "train_step_resnet", "value": 2000.0, "unit": "images/s"}],
            "pipeline": [{"name": "pipeline_memory", "value": 5000.0, "unit": "images/s"}],
            "peer_torch": [{"name": "scoring", "variant": "compile", "masks": 256, "masks_per_s": 300.0},
                           {"name": "train_step", "variant": "eager", "images_per_s": 1000.0}]}
    for name, results in rows.items():
        benchmark = "search_throughput" if name.startswith("search") else name
        (tmp_path / f"{name}.json").write_text(json.dumps({"benchmark": benchmark, "machine": {"device": "test"},
                                                           "results": results}))
    result = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "summarize.py"), str(tmp_path)],
                            capture_output=True, text=True, check=True)
    ratios = json.loads((tmp_path / "summary.json").read_text())["ratios"]
    assert ratios == {"scoring_vs_best_torch_compile": 2.0, "train_step_vs_torch_eager": 2.0,
                      "pipeline_vs_train_step": 2.5}
    assert "scoring_vs_best_torch_compile" in result.stdout
