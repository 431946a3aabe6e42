#!/usr/bin/env python3
"""PyTorch peer of the project's ResNet benchmarks, run in the same job on the same card.

Measures, for one image size / batch / class count:

* `inference`  - images/s of the forward pass (BatchNorm folded into the convolutions, as the
  project's functional network is), eager and `torch.compile`;
* `train_step` - images/s of one SGD step (momentum 0.9, weight decay 5e-4 on conv/dense kernels
  only, cross-entropy), eager and `torch.compile` (the model is compiled, forward and backward;
  the foreach optimizer step stays eager);
* `scoring`    - masks/s of the candidate scoring of Algorithm 1 (`jaxdesens.search.score_masks`):
  for M masks `(M, H, W)` and B images, the CE of `model(x * m)` averaged over the B images of
  each mask, with the masks folded into the batch (M*B images per call), eager and compiled.

The model takes images in [0, 1] and normalises them as the Flax model does, `(x - 0.5) / 0.5`.
On CUDA: bf16 autocast, channels_last, cuDNN benchmark mode, TF32 matmuls. On CPU: float32, each
measurement in both memory layouts (contiguous NCHW and channels_last; channels_last is 15-25%
faster for some of them with oneDNN), and the faster one is marked `"peer": true`: the peer the
JAX numbers are held against.
Each number is the median over timing windows of `--iters` calls each, after `--warmup` calls,
with `torch.cuda.synchronize()` around every window.

Time is bounded: eager measurements run in this process, each compiled measurement in a child
process that is killed past `--compile_timeout_s` or the overall `--time_budget_s` (what it had
finished is kept); once the budget is spent the remaining measurements are listed as skipped.
The JSON file is rewritten after every measurement, so a killed run still leaves its numbers.

    python benchmarks/peer_torch.py --json OUT.json [--device cuda|cpu] [--image_size 112]
        [--batch 256] [--classes 8631] [--scoring_masks 64,256] [--scoring_images 32]
        [--depth 34] [--compile|--no-compile] [--compile_mode default] [--time_budget_s 240]
        [--compile_timeout_s 150] [--iters N] [--warmup N] [--windows N] [--layouts L,...] [--quick]

`--compile` defaults to on for cuda and off for cpu. `--quick` is a CI-sized run (depth 18, 32 px,
batch 4, 16 classes, 2 masks x 4 images, 2 calls x 2 windows); explicit flags override it.

Needs only `torch` (no numpy); torchvision's `resnet18/34` is used when it imports,
otherwise an equivalent in-file definition with the same module names and parameter count.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as err:  # pragma: no cover - the message is the point
    raise SystemExit(f"benchmarks/peer_torch.py needs PyTorch (pip install torch): {err}") from err

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
LR = 0.01
SCORING_GAMMA = 3.0  # the objective's terms match jaxdesens.search.SearchConfig's defaults
SCORING_MIN_RATIO = 0.0

DEFAULTS = dict(depth=34, image_size=112, batch=256, classes=8631, scoring_masks=(64, 256), scoring_images=32)
QUICK = dict(depth=18, image_size=32, batch=4, classes=16, scoring_masks=(2,), scoring_images=4,
             iters=2, warmup=1, windows=2, threads=1)  # one CPU thread: immune to a busy shared machine
ITERATION_DEFAULTS = {"cuda": dict(iters=10, warmup=3, windows=5, threads=0),
                      "cpu": dict(iters=3, warmup=1, windows=3, threads=0)}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
PLAN = (("inference", "eager"), ("train_step", "eager"), ("scoring", "eager"),
        ("inference", "compile"), ("scoring", "compile"), ("train_step", "compile"))


# --------------------------------------------------------------------------------------------
# Model: torchvision when available, else the same layout defined here.
# --------------------------------------------------------------------------------------------

def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (same attribute names, so state dicts are interchangeable)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with basic blocks: 7x7/2 stem, 3x3/2 max-pool, four stages, linear head."""

    def __init__(self, layers: tuple[int, ...], num_classes: int = 1000):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet(depth: int = 34, num_classes: int = 1000, prefer_torchvision: bool = True) -> tuple[nn.Module, str]:
    """`(model, source)`: torchvision's `resnet{depth}` when it imports, else the in-file one."""
    if depth not in STAGE_SIZES:
        raise ValueError(f"depth must be one of {sorted(STAGE_SIZES)}, got {depth}")
    if prefer_torchvision:
        try:
            import torchvision.models as tvm
        except Exception:  # missing, or a build that does not match this torch
            pass
        else:
            return getattr(tvm, f"resnet{depth}")(num_classes=num_classes), "torchvision"
    return ResNet(STAGE_SIZES[depth], num_classes), "fallback"


def build_resnet34(num_classes: int = 1000, prefer_torchvision: bool = True) -> nn.Module:
    return build_resnet(34, num_classes, prefer_torchvision)[0]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every BatchNorm folded into the convolution before it."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()

    def fuse(parent: nn.Module, conv: str, bn: str) -> None:
        setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
        setattr(parent, bn, nn.Identity())

    fuse(model, "conv1", "bn1")
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            fuse(block, "conv1", "bn1")
            fuse(block, "conv2", "bn2")
            if block.downsample is not None:
                fuse(block.downsample, "0", "1")
    return model


class Peer(nn.Module):
    """Images in [0, 1], NCHW -> logits; normalised like the Flax model, `(x - 0.5) / 0.5`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2.0 - 1.0)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

class Runner:
    """Device, precision and timing shared by the measurements of one process."""

    def __init__(self, settings: dict[str, Any], deadline: float):
        self.s = settings
        if settings["threads"]:
            torch.set_num_threads(settings["threads"])
        self.device = torch.device(settings["device"])
        self.cuda = self.device.type == "cuda"
        self.deadline = deadline
        if self.cuda:
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")  # TF32 for the few float32 matmuls, as XLA's default
        gen = torch.Generator().manual_seed(0)
        size = settings["image_size"]
        self.gen = gen
        self.images = torch.rand(settings["batch"], 3, size, size, generator=gen).to(self.device)
        self.labels = torch.randint(0, settings["classes"], (settings["batch"],), generator=gen).to(self.device)

    def autocast(self):
        if self.cuda and self.s["dtype"] == "bfloat16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def model(self, train: bool, layout: str) -> nn.Module:
        net, _ = build_resnet(self.s["depth"], self.s["classes"], prefer_torchvision=not self.s["fallback_model"])
        net = net.to(self.device) if train else fold_batchnorm(net).to(self.device)
        return Peer(net).to(memory_format=MEMORY_FORMATS[layout]).train(train)

    def compiled(self, module: Callable) -> Callable:
        return torch.compile(module, mode=None if self.s["compile_mode"] == "default" else self.s["compile_mode"],
                             dynamic=False)

    def timed(self, fn: Callable[[], Any]) -> tuple[float, list[float]]:
        """`(first call s, [seconds per call of each window])`; warm-up calls include the first."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - t0
        for _ in range(self.s["warmup"] - 1):
            fn()
        self.sync()
        per_call = []
        for window in range(self.s["windows"]):
            if window and time.perf_counter() > self.deadline:
                break
            t0 = time.perf_counter()
            for _ in range(self.s["iters"]):
                fn()
            self.sync()
            per_call.append((time.perf_counter() - t0) / self.s["iters"])
        return first, per_call

    def result(self, name: str, variant: str, layout: str, first: float, per_call: list[float], images: int,
               masks: int | None = None) -> dict[str, Any]:
        median = statistics.median(per_call)
        row: dict[str, Any] = {"name": name, "variant": variant, "layout": layout}
        if masks is not None:
            row.update(masks=masks, images_per_mask=images // masks, masks_per_s=masks / median)
        row.update(images_per_s=images / median, images_per_call=images, ms_per_call=median * 1e3,
                   window_ms=[round(t * 1e3, 4) for t in per_call], first_call_s=round(first, 3))
        if self.cuda:
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return row

    # -- the three measurements: a callable each (shared with benchmarks/cpu_parity.py) ----------

    def inference_call(self, variant: str, layout: str) -> tuple[Callable[[], Any], int]:
        """`(call, images per call)`: the BN-folded forward pass on the batch."""
        model = self.model(train=False, layout=layout)
        forward = model if variant == "eager" else self.compiled(model)
        x = self.images.contiguous(memory_format=MEMORY_FORMATS[layout])

        def call():
            with torch.inference_mode(), self.autocast():
                return forward(x)

        return call, len(x)

    def train_step_call(self, variant: str, layout: str) -> tuple[Callable[[], Any], int]:
        """`(call, images per call)`: one SGD step on the batch."""
        model = self.model(train=True, layout=layout)
        kernels = [p for p in model.parameters() if p.ndim > 1]
        others = [p for p in model.parameters() if p.ndim <= 1]
        opt = torch.optim.SGD([{"params": kernels, "weight_decay": WEIGHT_DECAY},
                               {"params": others, "weight_decay": 0.0}], lr=LR, momentum=MOMENTUM)
        forward = model if variant == "eager" else self.compiled(model)
        x, y = self.images.contiguous(memory_format=MEMORY_FORMATS[layout]), self.labels

        def step():
            with self.autocast():
                logits = forward(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return step, len(x)

    def scoring_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        b, size = self.s["scoring_images"], self.s["image_size"]
        images = torch.rand(b, 3, size, size, generator=self.gen).to(self.device)
        return images, torch.randint(0, self.s["classes"], (b,), generator=self.gen).to(self.device)

    def scoring_call(self, variant: str, layout: str, masks: torch.Tensor, images: torch.Tensor,
                     labels: torch.Tensor) -> tuple[Callable[[], Any], int]:
        """`(call, images per call)`: objective, CE and ratio of each mask `(M, H, W)` on the images
        `(B, 3, H, W)`, the masks folded into the batch (M * B images per call)."""
        model = self.model(train=False, layout=layout)
        memory_format = MEMORY_FORMATS[layout]
        autocast = self.autocast

        def score(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor):
            m, n = masks.shape[0], images.shape[0]
            x = (images.unsqueeze(0) * masks[:, None, None]).reshape(m * n, *images.shape[1:])
            x = x.contiguous(memory_format=memory_format)
            with autocast():
                logits = model(x)
            ce = F.cross_entropy(logits.float(), labels.repeat(m), reduction="none").view(m, n).mean(1)
            ratio = 1.0 - masks.float().mean((1, 2))
            objective = torch.where(ratio >= SCORING_MIN_RATIO, ce - SCORING_GAMMA * ratio,
                                    torch.full_like(ce, float("inf")))
            return objective, ce, ratio

        scorer = score if variant == "eager" else self.compiled(score)

        def call():
            with torch.inference_mode():
                return scorer(images, labels, masks)

        return call, len(masks) * len(images)

    def inference(self, variant: str):
        for layout in self.s["layouts"]:
            call, images = self.inference_call(variant, layout)
            yield self.result("inference", variant, layout, *self.timed(call), images)

    def train_step(self, variant: str):
        for layout in self.s["layouts"]:
            call, images = self.train_step_call(variant, layout)
            yield self.result("train_step", variant, layout, *self.timed(call), images)

    def scoring(self, variant: str):
        images, labels = self.scoring_images()
        size = self.s["image_size"]
        for i, m in enumerate(self.s["scoring_masks"]):
            if i and time.perf_counter() > self.deadline:
                raise TimeoutError(f"time budget spent before M={m}")
            masks = (torch.rand(m, size, size, generator=self.gen) < 0.7).float().to(self.device)
            for layout in self.s["layouts"]:
                call, n = self.scoring_call(variant, layout, masks, images, labels)
                yield self.result("scoring", variant, layout, *self.timed(call), n, masks=m)
            del masks
            if self.cuda:
                torch.cuda.empty_cache()

    def run(self, name: str, variant: str):
        yield from getattr(self, name)(variant)


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------

def _parse_masks(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--scoring_masks wants positive integers like 64,256, got {text!r}")
    return values


def _parse_layouts(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or set(values) - set(MEMORY_FORMATS):
        raise argparse.ArgumentTypeError(f"--layouts wants a comma list of {sorted(MEMORY_FORMATS)}, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--image_size", type=int, default=None, help=f"default {DEFAULTS['image_size']}")
    p.add_argument("--batch", type=int, default=None, help=f"inference/train batch, default {DEFAULTS['batch']}")
    p.add_argument("--classes", type=int, default=None, help=f"default {DEFAULTS['classes']} (VGGFace2)")
    p.add_argument("--scoring_masks", type=_parse_masks, default=None, help="masks per call, default 64,256")
    p.add_argument("--scoring_images", type=int, default=None, help="images per mask (B), default 32")
    p.add_argument("--depth", type=int, choices=sorted(STAGE_SIZES), default=None, help="default 34")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure torch.compile variants (default: on for cuda, off for cpu, where "
                        "inductor's C++ build takes 40-90 s per graph on a small machine)")
    p.add_argument("--compile_mode", default="default",
                   choices=("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"),
                   help="torch.compile mode; the max-autotune modes take minutes")
    p.add_argument("--compile_timeout_s", type=float, default=150.0,
                   help="each compiled measurement (a child process) is killed after this long")
    p.add_argument("--time_budget_s", type=float, default=240.0,
                   help="no new measurement starts after this; running children are killed at it")
    p.add_argument("--iters", type=int, default=None, help="calls per timing window (cuda 10, cpu 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls, >= 1 (cuda 3, cpu 1)")
    p.add_argument("--windows", type=int, default=None, help="timing windows; the median is reported (cuda 5, cpu 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (0 = torch's default; --quick uses 1, as OpenMP collapses when "
                        "the cores are shared)")
    p.add_argument("--layouts", type=_parse_layouts, default=None,
                   help="memory layouts to measure, of contiguous,channels_last (default: channels_last on cuda, "
                        "both on cpu)")
    p.add_argument("--only", default=None, help="comma list of measurements to run (inference,train_step,scoring)")
    p.add_argument("--fallback_model", action="store_true", help="use the in-file ResNet even if torchvision imports")
    p.add_argument("--quick", action="store_true",
                   help="tiny CI settings: depth 18, 32 px, batch 4, 16 classes, 2 masks x 4 images, 2 iterations")
    # Internal: one compiled measurement in a child process.
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_settings", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_deadline_in_s", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    s: dict[str, Any] = {}
    for key in ("depth", "image_size", "batch", "classes", "scoring_masks", "scoring_images", "iters", "warmup",
                "windows", "threads"):
        explicit = getattr(args, key)
        fallback = (QUICK if args.quick and key in QUICK else {**DEFAULTS, **ITERATION_DEFAULTS[device]})[key]
        s[key] = explicit if explicit is not None else fallback
    for key in ("image_size", "batch", "classes", "scoring_images", "iters", "warmup", "windows"):
        if s[key] < 1:
            raise SystemExit(f"--{key} must be >= 1, got {s[key]}")
    s["scoring_masks"] = list(s["scoring_masks"])
    if s["threads"] < 0:
        raise SystemExit(f"--threads must be >= 0, got {s['threads']}")
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    only = [m.strip() for m in args.only.split(",")] if args.only else ["inference", "train_step", "scoring"]
    unknown = set(only) - {"inference", "train_step", "scoring"}
    if unknown:
        raise SystemExit(f"--only: unknown measurement(s) {sorted(unknown)}")
    s.update(device=device, quick=args.quick, compile=device == "cuda" if args.compile is None else args.compile,
             compile_mode=args.compile_mode,
             compile_timeout_s=args.compile_timeout_s, time_budget_s=args.time_budget_s, only=only,
             dtype="bfloat16" if device == "cuda" else "float32", autocast=device == "cuda",
             layouts=args.layouts or (["channels_last"] if device == "cuda" else list(MEMORY_FORMATS)),
             fallback_model=args.fallback_model, inference_bn_folded=True,
             optimizer=f"SGD lr={LR} momentum={MOMENTUM} weight_decay={WEIGHT_DECAY} (kernels only), foreach",
             scoring_objective=f"CE - {SCORING_GAMMA} * ratio, ratio floor {SCORING_MIN_RATIO}",
             torch_threads=torch.get_num_threads())
    return s


def environment(settings: dict[str, Any]) -> dict[str, Any]:
    try:
        import torchvision
        import torchvision.models  # noqa: F401  (what build_resnet imports)
        tv = torchvision.__version__
    except Exception:
        tv = None
    source = "torchvision" if tv and not settings["fallback_model"] else "fallback"
    if settings["device"] == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} threads)")
    return {"device": name, "torch": torch.__version__, "torchvision": tv, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if settings["device"] == "cuda" else None,
            "python": platform.python_version(), "model_source": source}


def worker_main(args: argparse.Namespace) -> int:
    """Child process: one compiled measurement, one JSON line per result as soon as it exists."""
    settings = json.loads(args._settings)
    deadline = time.perf_counter() + args._deadline_in_s
    runner = Runner(settings, deadline)
    with open(args._out, "a") as out:
        for row in runner.run(args._worker, "compile"):
            out.write(json.dumps(row) + "\n")
            out.flush()
    return 0


def _run_child(name: str, settings: dict[str, Any], timeout: float) -> tuple[list[dict], str | None]:
    """Runs one compiled measurement in a child process; `(rows, failure reason or None)`."""
    with tempfile.TemporaryDirectory(prefix="peer_torch_") as tmp:
        out, log_path = Path(tmp) / "rows.jsonl", Path(tmp) / "child.log"
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", name, "--_settings", json.dumps(settings),
               "--_out", str(out), "--_deadline_in_s", str(max(timeout - 5.0, 1.0))]
        reason = None
        with open(log_path, "w") as log_file:
            child = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = child.wait(timeout=timeout)
                if code != 0:
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-6:]
                    reason = f"child exited with {code}: " + " | ".join(tail)[-600:]
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)  # the child and its compile workers
                child.wait()
                reason = f"killed after {timeout:.0f} s (compile or time budget)"
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return rows, reason


def _unit(row: dict) -> tuple[str, float, str]:
    if row["name"] == "scoring":
        return f"scoring M={row['masks']} x B={row['images_per_mask']}", row["masks_per_s"], "masks/s"
    return row["name"], row["images_per_s"], "images/s"


def mark_peers(results: list[dict]) -> None:
    """Marks `"peer": true` on the fastest layout of each measurement (name, variant, masks)."""
    best: dict[tuple, dict] = {}
    for row in results:
        key = (row["name"], row["variant"], row.get("masks"))
        if key not in best or row["ms_per_call"] < best[key]["ms_per_call"]:
            best[key] = row
    for row in results:
        row["peer"] = any(row is b for b in best.values())


def table(results: list[dict], skipped: list[dict]) -> str:
    lines = ["| measurement | variant | layout | value | unit |", "|---|---|---|---:|---|"]
    for row in results:
        label, value, unit = _unit(row)
        peer = " (peer)" if row.get("peer") and len({r.get("layout") for r in results}) > 1 else ""
        lines.append(f"| {label} | {row['variant']} | {row.get('layout', '')}{peer} | {value:,.1f} | {unit} |")
    for row in skipped:
        label = row["name"] + (f" M={row['masks']}" if "masks" in row else "")
        lines.append(f"| {label} | {row['variant']} | | skipped | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        return worker_main(args)
    start = time.perf_counter()
    settings = resolve_settings(args)
    deadline = start + settings["time_budget_s"]
    report: dict[str, Any] = {**environment(settings), "settings": settings, "results": [], "skipped": [],
                              "complete": False}

    def write() -> None:
        report["elapsed_s"] = round(time.perf_counter() - start, 2)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            os.replace(tmp, args.json)

    def log(msg: str) -> None:
        print(f"[peer_torch {time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    def skip(name: str, variant: str, reason: str, masks: list[int] | None = None) -> None:
        for m in masks or [None]:
            entry = {"name": name, "variant": variant, "reason": reason}
            if m is not None:
                entry["masks"] = m
            report["skipped"].append(entry)
        log(f"skipped {name}/{variant}: {reason}")

    log(f"{report['device']}, torch {report['torch']}, model {report['model_source']}, settings "
        + json.dumps({k: settings[k] for k in ('depth', 'image_size', 'batch', 'classes', 'scoring_masks',
                                                'scoring_images', 'dtype', 'compile')}))
    runner = Runner(settings, deadline)
    for name, variant in PLAN:
        if name not in settings["only"] or (variant == "compile" and not settings["compile"]):
            continue
        masks = settings["scoring_masks"] if name == "scoring" else None
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            skip(name, variant, "time budget spent", masks)
            write()
            continue
        if variant == "eager":
            done: list[int] = []
            try:
                for row in runner.run(name, variant):
                    report["results"].append(row)
                    done.append(row.get("masks"))
                    log(f"{name}/{variant}/{row['layout']}: {_unit(row)[1]:,.1f} {_unit(row)[2]} "
                        f"({row['ms_per_call']:.2f} ms/call)")
                    write()
            except Exception as err:  # an OOM or a budget stop: record it and go on
                left = [m for m in masks if m not in done] if masks else None
                skip(name, variant, f"{type(err).__name__}: {err}"[:600], left)
            if runner.cuda:
                torch.cuda.empty_cache()
        else:
            timeout = min(settings["compile_timeout_s"], remaining)
            if remaining < min(15.0, settings["compile_timeout_s"]):
                skip(name, variant, f"only {remaining:.0f} s of the time budget left", masks)
                write()
                continue
            log(f"{name}/compile: child process, at most {timeout:.0f} s")
            rows, reason = _run_child(name, settings, timeout)
            for row in rows:
                report["results"].append(row)
                log(f"{name}/compile/{row['layout']}: {_unit(row)[1]:,.1f} {_unit(row)[2]} "
                    f"({row['ms_per_call']:.2f} ms/call, first call {row['first_call_s']:.1f} s)")
            if reason and masks:
                done = [row["masks"] for row in rows]
                if [m for m in masks if m not in done]:
                    skip(name, variant, reason, [m for m in masks if m not in done])
            elif reason and not rows:
                skip(name, variant, reason)
        write()
    report["complete"] = not report["skipped"]
    mark_peers(report["results"])
    write()
    print()
    print(table(report["results"], report["skipped"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
