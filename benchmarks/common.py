"""Shared benchmark plumbing: timing windows, machine description, JSON output, tables.

Every benchmark times a compiled callable over several windows after warm-up and reports the
median window (robust to a stray slow window), writes JSON and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> dict[str, Any]:
    import flax
    import jax

    device = jax.devices()[0]
    return {"platform": device.platform, "device": device.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version(),
            "host": platform.machine(), "date": time.strftime("%Y-%m-%d")}


def time_it(fn: Callable[[], Any], items: int, warmup: int = 2, windows: int = 5, iters: int = 5,
            budget_s: float | None = None) -> dict[str, float]:
    """Median items/s over `windows` windows of `iters` calls each; `fn` must block until done."""
    for _ in range(warmup):
        fn()
    rates = []
    start = time.perf_counter()
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        rates.append(items * iters / (time.perf_counter() - t0))
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return {"per_s": statistics.median(rates), "best_per_s": max(rates), "windows": len(rates)}


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", type=Path, default=None, help="write results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny CI-sized settings (a smoke test)")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    return parser


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The network every JAX benchmark builds: the paper's ResNet-34 at 112 px by default."""
    parser.add_argument("--depth", type=int, default=34)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--classes", type=int, default=8631, help="head size (8,631 as VGGFace2)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true")


def quick_model(args: argparse.Namespace) -> None:
    """CI-sized network and timing for `--quick`."""
    args.depth, args.image_size, args.classes, args.width, args.windows, args.iters = 18, 32, 10, 0.125, 2, 1


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Writes `report` to `path` atomically (a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def finish(name: str, settings: dict[str, Any], rows: list[dict[str, Any]], path: Path | None) -> dict[str, Any]:
    """Writes `{"benchmark", "machine", "settings", "results"}` and prints the table last."""
    report = {"benchmark": name, "machine": machine(), "settings": settings, "results": rows}
    if path is not None:
        write_json(path, report)
    print(table(report))
    return report


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"## {report['benchmark']} on {m['device']} x{m['device_count']} (jax {m['jax']}, {m['date']})",
             "| measurement | value | unit | notes |", "|---|---:|---|---|"]
    for row in report["results"]:
        lines.append(f"| {row['name']} | {row['value']:,.1f} | {row['unit']} | {row.get('notes', '')} |")
    return "\n".join(lines)
