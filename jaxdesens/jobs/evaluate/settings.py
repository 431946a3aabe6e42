"""The evaluation job's settings (the flags of launch/evaluate.py), checked when built."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxdesens.metrics.attacks import ATTACK_METHODS
from jaxdesens.privacy.audit_job import ATTACKERS as OFF_THE_SHELF


@dataclasses.dataclass(frozen=True)
class EvaluateJob:
    checkpoints: tuple[str, ...] = ()
    mask: str = ""
    out: str = ""
    data: str | None = None
    lfw_pairs: str | None = None
    lfw_root: str | None = None
    test_data: str | None = None
    flip: bool = False
    repeats: int = 5
    baseline_n: int = 200
    baseline_images: int = 32
    baseline_gamma: float | None = None
    baseline_attack: str = "telea"
    attacks: str = "all"
    attack_images: int = 100
    examples: int = 4
    batch_size: int = 128
    seed: int = 0
    audit: bool = True
    audit_probes: int = 100
    audit_attackers: str = "dlib"
    restorer: str | None = None

    def __post_init__(self):
        checkpoints = self.checkpoints
        if checkpoints is None:
            checkpoints = ()
        elif isinstance(checkpoints, (str, Path)):
            checkpoints = (checkpoints,)
        object.__setattr__(self, "checkpoints", tuple(str(c) for c in checkpoints))
        if (self.lfw_pairs is None) != (self.lfw_root is None):
            raise ValueError("--lfw_pairs and --lfw_root go together (the pairs file and the image root)")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.baseline_n < 0:
            raise ValueError(f"--baseline_n must be >= 0 (0 skips Table 2), got {self.baseline_n}")
        if self.baseline_images < 1:
            raise ValueError(f"--baseline_images must be >= 1, got {self.baseline_images}")
        if self.baseline_attack not in ATTACK_METHODS:
            raise ValueError(f"--baseline_attack must be one of {'|'.join(ATTACK_METHODS)}, "
                             f"got {self.baseline_attack!r}")
        if self.attack_images < 0:
            raise ValueError(f"--attack_images must be >= 0 (0 = every test image), got {self.attack_images}")
        if self.examples < 1 or self.batch_size < 1:
            raise ValueError(f"--examples and --batch_size must be >= 1, got {self.examples}, {self.batch_size}")
        parse_attacks(self.attacks)
        if self.audit_probes < 0:
            raise ValueError(f"--audit_probes must be >= 0 (0 = every probe), got {self.audit_probes}")
        unknown = sorted(set(a for a in self.audit_attackers.split(",") if a) - set(OFF_THE_SHELF))
        if unknown:
            raise ValueError(f"--audit_attackers: unknown {unknown}; a comma list of {','.join(OFF_THE_SHELF)} "
                             "(or empty: only the recipient models)")

    @property
    def attack_methods(self) -> tuple[str, ...]:
        return parse_attacks(self.attacks)


def parse_attacks(text: str) -> tuple[str, ...]:
    """`all`, `none` (or empty) or a comma list of `ATTACK_METHODS`, in the order given."""
    text = text.strip().lower()
    if text == "all":
        return ATTACK_METHODS
    if text in ("", "none"):
        return ()
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in methods if m not in ATTACK_METHODS]
    if bad:
        raise ValueError(f"--attacks: unknown method(s) {bad}; use 'all', 'none' or a comma list of "
                         f"{','.join(ATTACK_METHODS)}")
    return tuple(dict.fromkeys(methods))

