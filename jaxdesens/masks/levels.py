"""Hole-ratio levels: the six NVIDIA irregular-mask buckets of the paper's Tables 1-2.

The paper samples NVIDIA's mask dataset by hole-to-image ratio. We draw our own masks instead:
free-form strokes are the holes (mask = 1 - strokes), generated in batches on device and kept
only if their hidden share falls in the wanted bucket, until every bucket is full.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdesens.masks.freeform import StrokeRanges, random_strokes
from jaxdesens.masks.ops import mask_ratio

# Hidden share per level, intervals (low, high].
LEVELS: tuple[tuple[float, float], ...] = ((0.01, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6))

# One broad range for every level, so a single compiled generator fills all buckets: the default
# strokes with wider brushes put at least ~8% of the draws in each bucket (0.5-0.6 is the rarest).
LEVEL_RANGES = dataclasses.replace(StrokeRanges(), max_brush_width=(0.02, 0.4))

# Ratios this close to a bucket edge are rejected, so the float32 ratios bucketed here (on device)
# and float64 `mask_ratio`s of the same masks on the host can never put one mask in different levels.
_EDGE_MARGIN = 1e-6


def level_of(ratio: float, levels: tuple[tuple[float, float], ...] = LEVELS) -> int:
    """Index of the level whose (low, high] holds `ratio` (hidden share), or -1 if none does."""
    for index, (low, high) in enumerate(levels):
        if low < ratio <= high:
            return index
    return -1


def _bucket(ratios: np.ndarray, levels: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Vectorised `level_of` that also rejects ratios within `_EDGE_MARGIN` of an edge."""
    index = np.full(ratios.shape, -1, np.int64)
    for i, (low, high) in enumerate(levels):
        index[(ratios > low + _EDGE_MARGIN) & (ratios <= high - _EDGE_MARGIN)] = i
    return index


@functools.partial(jax.jit, static_argnames=("n", "height", "width", "ranges"))
def _hole_batch(key: jax.Array, n: int, height: int, width: int, ranges: StrokeRanges) -> tuple[jax.Array, jax.Array]:
    """`n` masks with strokes as holes, as uint8 (1 = visible) to keep the host copy small, and their ratios."""
    masks = (1 - random_strokes(key, n, height, width, ranges)).astype(jnp.uint8)
    return masks, mask_ratio(masks)


def _fill_levels(
    key: jax.Array,
    height: int,
    width: int,
    counts: tuple[int, ...],
    levels: tuple[tuple[float, float], ...],
    ranges: StrokeRanges | None,
    batch: int,
    max_rounds: int,
) -> list[np.ndarray]:
    """Rejection sampling: one device batch per round until level i holds counts[i] masks."""
    ranges = LEVEL_RANGES if ranges is None else ranges
    kept: list[list[np.ndarray]] = [[] for _ in levels]
    have = [0] * len(levels)
    for _ in range(max_rounds):
        if all(h >= c for h, c in zip(have, counts)):
            break
        key, sub = jax.random.split(key)
        masks, ratios = jax.device_get(_hole_batch(sub, batch, height, width, ranges))
        index = _bucket(ratios, levels)
        for i, need in enumerate(counts):
            take = np.flatnonzero(index == i)[: max(need - have[i], 0)]
            kept[i].append(masks[take])
            have[i] += take.size
    short = [f"{levels[i]} has {have[i]}/{c}" for i, c in enumerate(counts) if have[i] < c]
    if short:
        raise RuntimeError(
            f"hole-ratio levels not filled after {max_rounds} rounds of {batch} masks: {', '.join(short)}; "
            "widen the stroke ranges (more strokes, wider brushes) or raise max_rounds"
        )
    return [np.concatenate(k)[:c] for k, c in zip(kept, counts)]


def make_level_bank(
    key: jax.Array,
    height: int,
    width: int,
    per_level: int,
    levels: tuple[tuple[float, float], ...] = LEVELS,
    ranges: StrokeRanges | None = None,
    batch: int = 1024,
    max_rounds: int = 200,
) -> np.ndarray:
    """(len(levels), per_level, H, W) uint8 masks, 1 = visible, each level's ratios in its bucket.

    Built once and put on device, it replaces the NVIDIA mask dataset in training (resnet-mask)
    via `level_masks`. `ranges=None` uses `LEVEL_RANGES`.
    """
    counts = (per_level,) * len(levels)
    return np.stack(_fill_levels(key, height, width, counts, levels, ranges, batch, max_rounds))


def masks_at_level(
    key: jax.Array,
    level_index: int,
    n: int,
    height: int,
    width: int,
    *,
    levels: tuple[tuple[float, float], ...] = LEVELS,
    ranges: StrokeRanges | None = None,
    batch: int = 1024,
    max_rounds: int = 200,
) -> np.ndarray:
    """`n` masks (n, H, W) float32 from one level: the Table 1 evaluation and Section 4.2 search."""
    if not 0 <= level_index < len(levels):
        raise ValueError(f"level_index={level_index} is outside 0..{len(levels) - 1}")
    counts = tuple(n if i == level_index else 0 for i in range(len(levels)))
    return _fill_levels(key, height, width, counts, levels, ranges, batch, max_rounds)[level_index].astype(np.float32)


def level_masks(key: jax.Array, bank: jax.Array, n: int) -> jax.Array:
    """`n` masks (n, H, W) float32 from `bank`, each with a uniformly random level and index.

    Jittable (n static), so a train step can draw fresh masks from a device-resident bank.
    """
    bank = jnp.asarray(bank)
    k_level, k_index = jax.random.split(key)
    level = jax.random.randint(k_level, (n,), 0, bank.shape[0])
    index = jax.random.randint(k_index, (n,), 0, bank.shape[1])
    return bank[level, index].astype(jnp.float32)
