"""The evaluation's figures: examples.png (Figs. 5, 7), levels.png (Fig. 4), baseline.png (Fig. 5)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdesens import figures
from jaxdesens.jobs.evaluate.quality import desensitization_methods
from jaxdesens.jobs.evaluate.sets import EvalSet
from jaxdesens.jobs.evaluate.tables import level_name
from jaxdesens.masks import LEVELS
from jaxdesens.masks.ops import apply_mask
from jaxdesens.metrics.attacks import inpaint


def _example_indices(evalset: EvalSet, count: int) -> np.ndarray:
    count = min(count, len(evalset.images))
    return np.arange(count) * len(evalset.images) // count


def write_figures(out: Path, evalset: EvalSet, mask: np.ndarray, artifacts: dict[str, Any],
                  attacks: Sequence[str], count: int = 4) -> list[str]:
    """examples.png (Figs. 5, 7), levels.png (Fig. 4), baseline.png (Fig. 5); returns the file names."""
    from jaxdesens.desensitize import desensitize

    faces = evalset.images[_example_indices(evalset, count)].astype(np.float32) / 255.0
    columns = [("original", faces), ("masked", apply_mask(faces, mask))]
    for spec in desensitization_methods(mask, faces.shape[1])[1:]:
        columns.append((spec["label"], np.asarray(desensitize(faces, spec["method"], size=spec["size"]))))
    for method in attacks:
        columns.append((f"{method}", inpaint(columns[1][1], mask, method)))
    figures.save_grid(out / "examples.png", [[c[1][i] for c in columns] for i in range(len(faces))],
                      labels=[c[0] for c in columns])
    written = ["examples.png"]
    level_masks_ = artifacts.get("level_examples")
    if level_masks_ is not None:
        figures.save_grid(out / "levels.png", [list(level_masks_), [apply_mask(faces[0], m) for m in level_masks_]],
                          labels=[level_name(level) for level in LEVELS])
        written.append("levels.png")
    if artifacts.get("baseline"):
        figures.save_grid(out / "baseline.png",
                          [[a["mask"], a["masked"], a["restored"]] for a in artifacts["baseline"]],
                          labels=["mask", "masked", "inpainted"])
        written.append("baseline.png")
    return written

