"""Masks for the restoration attacker: its training mixture, and a fixed reference mask.

The mixture covers what an export may carry: search-style masks (free-form strokes that stay
*visible*, as Algorithm 1 draws its candidates; median 78% hidden), hole-ratio-level masks
(strokes as *holes*, 1-60% hidden) and, when the attacker has it, the export's own mask, which
ships with the export. One step samples a group uniformly, then a mask of that group.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxdesens.masks.freeform import random_strokes
from jaxdesens.masks.levels import make_level_bank


def mask_bank(key: jax.Array, size: int, freeform: int, level_per_level: int,
              fixed: list[np.ndarray] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """`(bank (M, S, S) uint8 1 = visible, offsets (G,), sizes (G,), group names)`.

    Group g is `bank[offsets[g] : offsets[g] + sizes[g]]`; empty groups are left out.
    """
    k_free, k_level = jax.random.split(key)
    groups: list[tuple[str, np.ndarray]] = []
    if freeform:
        groups.append(("freeform-visible", np.asarray(random_strokes(k_free, freeform, size, size), np.uint8)))
    if level_per_level:
        levels = make_level_bank(k_level, size, size, level_per_level)
        groups.append(("hole-ratio-levels", levels.reshape(-1, size, size)))
    if len(fixed):
        groups.append(("export-mask", np.stack([np.asarray(m, np.uint8) for m in fixed])))
    if not groups:
        raise ValueError("the restorer needs at least one group of training masks")
    sizes = np.array([len(g) for _, g in groups], np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    return np.concatenate([g for _, g in groups]), offsets, sizes, [name for name, _ in groups]


def fixed_freeform_mask(size: int, hidden: float, seed: int = 0, tolerance: float = 0.02,
                        attempts: int = 64) -> np.ndarray:
    """A search-style free-form mask (visible strokes) hiding `hidden` +- `tolerance` of the image.

    The first such mask a seeded draw finds: a reference mask for comparing restorers that does
    not depend on any trained model or search.
    """
    if not 0 < hidden < 1:
        raise ValueError(f"hidden share must be in (0, 1), got {hidden}")
    key = jax.random.key(seed)
    for _ in range(attempts):
        key, draw = jax.random.split(key)
        masks = np.asarray(random_strokes(draw, 256, size, size), np.float32)
        ratios = 1.0 - masks.mean(axis=(1, 2))
        hits = np.flatnonzero(np.abs(ratios - hidden) <= tolerance)
        if hits.size:
            return masks[hits[0]]
    raise ValueError(f"no free-form mask within {tolerance} of {hidden:.0%} hidden in {attempts * 256} draws")
