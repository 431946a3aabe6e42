"""Combines the JSON files of a benchmark run into one table (and the ratios the targets name).

    python benchmarks/summarize.py RESULTS_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def value(reports: dict, bench: str, name: str, variant: str | None = None, **match) -> float | None:
    report = reports.get(bench)
    if report is None:
        return None
    for row in report["results"]:
        if row.get("name") != name or (variant is not None and row.get("variant") != variant):
            continue
        if all(row.get(k) == v for k, v in match.items()):
            return _number(row)
    return None


def _number(row: dict) -> float:
    """A row's headline number: `value` for jaxdesens rows, masks/s or images/s for the torch peer."""
    return row.get("value", row.get("masks_per_s", row.get("images_per_s")))


def main(directory: str) -> None:
    reports = {p.stem: json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))
               if p.stem != "summary"}
    lines = []
    for name, report in reports.items():
        machine = report.get("machine", {}).get("device") or report.get("device")
        lines.append(f"\n## {name} ({machine})")
        for row in report["results"]:
            label = " ".join(str(row[k]) for k in ("name", "variant", "masks") if k in row)
            number = _number(row)
            unit = row.get("unit", "masks/s" if "masks_per_s" in row else "images/s")
            lines.append(f"| {label} | {number:,.1f} | {unit} | {row.get('notes', '')} |")
    ratios = {}
    scoring = max((row["value"] for report in reports.values() if report.get("benchmark") == "search_throughput"
                   for row in report["results"] if row["name"] == "scoring"), default=None)
    torch_scoring = max((_number(row) for row in reports.get("peer_torch", {}).get("results", [])
                         if row["name"] == "scoring" and row.get("variant") == "compile"), default=None)
    if scoring and torch_scoring:
        ratios["scoring_vs_best_torch_compile"] = scoring / torch_scoring
    train = value(reports, "train", "train_step_resnet")
    torch_train = value(reports, "peer_torch", "train_step", "eager")
    if train and torch_train:
        ratios["train_step_vs_torch_eager"] = train / torch_train
    pipeline = value(reports, "pipeline", "pipeline_memory")
    if pipeline and train:
        ratios["pipeline_vs_train_step"] = pipeline / train
    summary = {"ratios": ratios, "reports": sorted(reports)}
    (Path(directory) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines.append("\n## ratios")
    lines += [f"| {k} | {v:.2f}x |" for k, v in ratios.items()]
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", metavar="RESULTS_DIR", help="folder of benchmark JSON files (one run); "
                        "summary.json is written into it")
    folder = parser.parse_args().results_dir
    if not Path(folder).is_dir():
        parser.error(f"RESULTS_DIR={folder}: no such folder")
    main(folder)
