#!/usr/bin/env python3
"""JAX against its PyTorch peer on the CPU, in one process, interleaved: forward, train step and
candidate scoring, at the project's defaults (no flag set by hand).

    python benchmarks/cpu_parity.py --json benchmarks/results/cpu/parity.json

ResNet-18 (width 1.0, as torchvision's), 64x64, float32, 100 classes, batch 64; scoring puts B=32 images under each
mask, `search.CPU_CHUNK` masks per call (the search's CPU default). JAX runs the project's own
code (`functional.forward`, `train.compile_train_step`, `search.score_masks`); PyTorch runs
`peer_torch.py`'s eager peer in both memory layouts, on `--threads` threads. Each round times one
window (`--iters` calls) of every (measurement, stack) pair, in reversed order every other round,
so a change in a shared machine's load hits every stack alike. Reported: the median seconds per
call over the rounds, and ratio = JAX time / time of the faster PyTorch layout (lower is better;
the targets of issue 17 are <= 1.15 for forward and train step, <= 1.20 for scoring), with the
median of the per-round ratios beside it. Run time is bounded by `--time_budget_s` (rounds stop
that would end past it, after at least `--min_rounds`): about 3 minutes on 2 quiet cores, at most
about 9 on 2 cores shared with several busy processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import peer_torch
import torch

from jaxdesens import parallel, xla_flags
from jaxdesens.config import TrainConfig
from jaxdesens.models import ResNet
from jaxdesens.models.functional import fold_batchnorm, forward
from jaxdesens.search import CPU_CHUNK, score_masks
from jaxdesens.train import MaskSource, build_model, compile_train_step, create_train_state

MEASUREMENTS = ("forward", "train_step", "scoring")
TARGETS = {"forward": 1.15, "train_step": 1.15, "scoring": 1.20}
ITERS = {"forward": 3, "train_step": 2, "scoring": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=64, help="forward and train-step batch")
    p.add_argument("--scoring_images", type=int, default=32, help="B: images under each mask")
    p.add_argument("--chunk", type=int, default=CPU_CHUNK, help="masks per scoring call (the search's CPU default)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch threads (XLA uses every core)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds at most")
    p.add_argument("--min_rounds", type=int, default=3)
    p.add_argument("--time_budget_s", type=float, default=420.0,
                   help="no new round starts that would end after this many seconds from the start")
    p.add_argument("--iters", type=int, default=None, help="calls per window (default: forward 3, train 2, scoring 1)")
    p.add_argument("--quick", action="store_true", help="CI smoke settings (tiny network, two rounds)")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.classes, args.batch = 32, 10, 4
        args.scoring_images, args.chunk, args.rounds, args.min_rounds, args.threads = 4, 2, 2, 2, 1
    if min(args.batch, args.scoring_images, args.chunk, args.rounds, args.min_rounds, args.threads) < 1:
        p.error("--batch, --scoring_images, --chunk, --rounds, --min_rounds and --threads must be >= 1")
    return args


def jax_calls(args: argparse.Namespace, scoring_masks: np.ndarray) -> dict[str, tuple[Callable[[], Any], int]]:
    """`{measurement: (call, images per call)}` for the project's own JAX code, compiled."""
    size = args.image_size
    rng = np.random.default_rng(0)
    config = TrainConfig(model="resnet", depth=args.depth, width=1.0, image_size=size,
                         batch_size=args.batch, steps=1000)
    mesh = parallel.make_mesh()
    model = build_model(config, args.classes)
    state = parallel.put_replicated(create_train_state(config, model, jax.random.key(0), (size, size, 3)), mesh)
    batch = parallel.put_batch({"image": rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8),
                                "label": rng.integers(0, args.classes, args.batch).astype(np.int32)}, mesh)
    masks_source, key = parallel.put_replicated((MaskSource(), jax.random.key(1)), mesh)
    step = compile_train_step(config, mesh, use_fsm=False)
    holder = [state]

    def train_call():
        holder[0], metrics = step(holder[0], batch, masks_source, key)
        return metrics["loss"].block_until_ready()

    variables = ResNet(depth=args.depth, num_classes=args.classes, width=1.0).init(
        jax.random.key(0), jnp.zeros((1, size, size, 3)))
    folded = fold_batchnorm(variables, args.depth)
    images = jnp.asarray(rng.random((args.batch, size, size, 3), np.float32))
    infer = jax.jit(forward).lower(folded, images).compile()

    b = args.scoring_images
    score_images = jnp.asarray(rng.random((b, size, size, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, args.classes, b).astype(np.int32))
    masks = jnp.asarray(scoring_masks)
    gamma, floor = jnp.float32(3.0), jnp.float32(0.0)
    scorer = score_masks.lower(folded, score_images, labels, masks, gamma, floor).compile()
    return {"forward": (lambda: infer(folded, images).block_until_ready(), args.batch),
            "train_step": (train_call, args.batch),
            "scoring": (lambda: scorer(folded, score_images, labels, masks, gamma, floor)["objective"]
                        .block_until_ready(), len(scoring_masks) * b)}


def torch_calls(args: argparse.Namespace, scoring_masks: np.ndarray, layout: str
                ) -> dict[str, tuple[Callable[[], Any], int]]:
    """The same three measurements by `peer_torch.py`'s eager peer in one memory layout."""
    settings = peer_torch.resolve_settings(peer_torch.parse_args(
        ["--device", "cpu", "--depth", str(args.depth), "--image_size", str(args.image_size), "--batch",
         str(args.batch), "--classes", str(args.classes), "--scoring_images", str(args.scoring_images),
         "--threads", str(args.threads), "--layouts", layout]))
    runner = peer_torch.Runner(settings, deadline=float("inf"))
    images, labels = runner.scoring_images()
    masks = torch.from_numpy(scoring_masks)
    return {"forward": runner.inference_call("eager", layout), "train_step": runner.train_step_call("eager", layout),
            "scoring": runner.scoring_call("eager", layout, masks, images, labels)}


def window(call: Callable[[], Any], iters: int) -> float:
    """Seconds per call over one window of `iters` calls."""
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - t0) / iters


def convolutions_on_ynnpack() -> bool:
    """Whether XLA:CPU sends a ResNet-sized convolution to YNNPACK in this process."""
    x, w = jnp.zeros((64, 32, 32, 64)), jnp.zeros((3, 3, 64, 64))
    conv = jax.jit(lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), ((1, 1), (1, 1)),
                                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return "ynn_fusion" in conv.lower(x, w).compile().as_text()


def measure(args: argparse.Namespace, log: Callable[[str], None], deadline: float) -> dict[str, Any]:
    size = args.image_size
    scoring_masks = (np.random.default_rng(1).random((args.chunk, size, size)) < 0.7).astype(np.float32)
    stacks: dict[str, dict[str, tuple[Callable[[], Any], int]]] = {}
    t0 = time.perf_counter()
    stacks["jax"] = jax_calls(args, scoring_masks)
    log(f"JAX compiled in {time.perf_counter() - t0:.0f} s")
    for layout in peer_torch.MEMORY_FORMATS:
        stacks[f"torch_{layout}"] = torch_calls(args, scoring_masks, layout)
    pairs = [(m, s) for m in MEASUREMENTS for s in stacks]
    for m, s in pairs:  # warm-up: first calls allocate, JIT-compiled code pages in
        stacks[s][m][0]()
    log(f"warm-up done at {time.perf_counter() - t0:.0f} s")
    seconds: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    start, round_s = time.perf_counter(), 0.0
    for r in range(args.rounds):
        if r >= args.min_rounds and time.perf_counter() + round_s > deadline:
            break
        round_start = time.perf_counter()
        for m, s in pairs if r % 2 == 0 else pairs[::-1]:
            seconds[(m, s)].append(window(stacks[s][m][0], args.iters or ITERS[m]))
        round_s = time.perf_counter() - round_start
        log(f"round {r + 1}: " + ", ".join(f"{m}/{s} {seconds[(m, s)][-1] * 1e3:.0f} ms" for m, s in pairs))
    rows = []
    for m in MEASUREMENTS:
        items = stacks["jax"][m][1]
        median = {s: statistics.median(seconds[(m, s)]) for s in stacks}
        peer = min((s for s in stacks if s != "jax"), key=median.get)
        per_round = [j / p for j, p in zip(seconds[(m, "jax")], seconds[(m, peer)])]
        unit = "masks/s" if m == "scoring" else "images/s"
        per_call = args.chunk if m == "scoring" else items
        row = {"name": m, "value": median["jax"] / median[peer], "unit": "x",
               "notes": f"JAX time / PyTorch time ({peer.removeprefix('torch_')}), target <= {TARGETS[m]}",
               "ratio_per_round_median": statistics.median(per_round), "target": TARGETS[m],
               "peer_layout": peer.removeprefix("torch_"), "rate_unit": unit, "items_per_call": per_call,
               "images_per_call": items}
        for s in stacks:
            row[f"{s}_per_s"] = per_call / median[s]
            row[f"{s}_ms"] = [round(t * 1e3, 2) for t in seconds[(m, s)]]
        rows.append(row)
    return {"rows": rows, "rounds": len(seconds[pairs[0]]), "measure_s": round(time.perf_counter() - start, 1)}


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"## cpu_parity on {m['device']} ({os.cpu_count()} cores; jax {m['jax']}, torch {report['torch']}, "
             f"{m['date']}), {report['rounds']} rounds, load {report['load_before']} -> {report['load_after']}",
             f"XLA convolution flag: {report['xla_flags_status']}; convolutions on YNNPACK: "
             f"{report['convolutions_on_ynnpack']}",
             "| measurement | JAX | PyTorch contiguous | PyTorch channels_last | unit | JAX/PyTorch time "
             "(best layout) | per-round median | target |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for row in report["results"]:
        lines.append(f"| {row['name']} | {row['jax_per_s']:,.1f} | {row['torch_contiguous_per_s']:,.1f} | "
                     f"{row['torch_channels_last_per_s']:,.1f} | {row['rate_unit']} | **{row['value']:.2f}** "
                     f"({row['peer_layout']}) | {row['ratio_per_round_median']:.2f} | <= {row['target']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[cpu_parity {time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    if jax.default_backend() != "cpu":
        raise SystemExit(f"cpu_parity measures the CPU; JAX's default backend here is {jax.default_backend()} "
                         "(set JAX_PLATFORMS=cpu)")
    torch.set_num_threads(args.threads)
    load_before = [round(v, 2) for v in os.getloadavg()]
    log(f"load average {load_before}; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r} ({xla_flags.STATUS})")
    measured = measure(args, log, deadline=start + args.time_budget_s)
    settings = {k: v for k, v in vars(args).items() if k != "json"} | {"dtype": "float32",
                                                                       "xla_flags": os.environ.get("XLA_FLAGS")}
    report = {"benchmark": "cpu_parity", "machine": common.machine(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "settings": settings, "results": measured["rows"],
              "rounds": measured["rounds"], "measure_s": measured["measure_s"], "load_before": load_before,
              "load_after": [round(v, 2) for v in os.getloadavg()], "xla_flags_status": xla_flags.STATUS,
              "convolutions_on_ynnpack": convolutions_on_ynnpack(),
              "elapsed_s": round(time.perf_counter() - start, 1)}
    if args.json:
        common.write_json(args.json, report)
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
