"""Run configuration: one frozen dataclass per job, stored beside the checkpoints it produced."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

MODELS = ("resnet", "mask", "fsm")


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
