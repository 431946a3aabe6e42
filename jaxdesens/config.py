"""Run configuration: one frozen dataclass per job, stored beside the checkpoints it produced."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

MODELS = ("resnet", "mask", "fsm")

# --help text of each TrainConfig field, shared by every command that trains.
TRAIN_HELP = {
    "model": "resnet (clean images), mask (masked images) or fsm (masked images + FSM branch)",
    "data": "identity folder, desensitized export or array_record set; none = synthetic faces",
    "mask": "mask file (.png or .npy, 1/255 = visible) for --model=mask|fsm; none = random level masks",
    "depth": "ResNet depth, 18 or 34",
    "width": "channel width multiplier (1.0 = 64..512 channels)",
    "image_size": "side in pixels images are resized to",
    "channels": "3 (RGB) or 1 (grey)",
    "fsm_after": "insert the FSM gate after layer 1..4",
    "batch_size": "global batch, split over the devices",
    "steps": "training steps",
    "lr": "initial SGD learning rate (divided by ten at 50%%, 70%% and 90%% of the steps)",
    "momentum": "SGD momentum",
    "weight_decay": "L2 weight decay on convolution and dense kernels",
    "bf16": "bfloat16 compute with float32 parameters",
    "zero_init_residual": "start every residual block as the identity (last BatchNorm scale 0)",
    "flip": "random horizontal flips (turned off on a desensitized export)",
    "seed": "seed of the initialisation, batches, flips and random masks",
    "holdout": "share of identities held out (never trained on) for verification",
    "split_seed": "seed of the identity split (models compared on one test set need the same one)",
    "level_bank_size": "random masks drawn per hole-ratio level for --model=mask|fsm without --mask",
    "synthetic_identities": "identities of the synthetic set (without --data)",
    "synthetic_images_per_identity": "images per identity of the synthetic set (without --data)",
    "checkpoint_every": "steps between checkpoints",
    "keep_checkpoints": "checkpoints kept (the newest)",
    "log_every": "steps between metrics lines (metrics.jsonl, TensorBoard)",
    "eval_batch_size": "batch of the held-out verification",
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes.

    `model`: `resnet` trains on clean images; `mask` on masked images (the `--mask` file, else a
    fresh random hole-ratio-level mask per image); `fsm` like `mask` with the Feature Selection
    Masknet fed the same mask. The defaults are sized for the embedded synthetic set on a CPU.
    """

    model: str = "resnet"
    data: str | None = None
    mask: str | None = None
    depth: int = 18
    width: float = 0.25
    image_size: int = 64
    channels: int = 3
    fsm_after: int = 3
    batch_size: int = 64
    steps: int = 600
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bf16: bool = False
    zero_init_residual: bool = False
    flip: bool = True
    seed: int = 0
    holdout: float = 0.25
    split_seed: int = 0
    level_bank_size: int = 256
    synthetic_identities: int = 96
    synthetic_images_per_identity: int = 12
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_batch_size: int = 128

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {'|'.join(MODELS)}, got {self.model!r}")
        if self.fsm_after not in (1, 2, 3, 4):
            raise ValueError(f"--fsm_after must be 1, 2, 3 or 4, got {self.fsm_after}")
        if self.depth not in (18, 34):
            raise ValueError(f"--depth must be 18 or 34, got {self.depth}")
        for name in ("steps", "batch_size", "image_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.channels not in (1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {self.channels}")
        if not self.width > 0:
            raise ValueError(f"--width must be > 0, got {self.width}")

    # Fields that do not change what is computed may differ when a run resumes.
    RESUMABLE_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "eval_batch_size", "data", "mask")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def config_differences(stored: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable `key: stored -> current` lines for every field that differs."""
    keys = sorted(set(stored) | set(current))
    return [f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in keys
            if k not in ignore and stored.get(k) != current.get(k)]


def dumps(values: dict[str, Any]) -> str:
    return json.dumps(values, indent=2, sort_keys=True)
