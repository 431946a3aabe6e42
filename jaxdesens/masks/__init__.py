"""Masks (1 = visible, 0 = hidden): free-form strokes on device, hole-ratio levels, mask files."""

from jaxdesens.masks.freeform import (
    StrokeParams,
    StrokeRanges,
    draw_strokes,
    random_strokes,
    rasterise_capsules,
    sample_stroke_params,
)
from jaxdesens.masks.io import load_mask, save_mask
from jaxdesens.masks.levels import LEVEL_RANGES, LEVELS, level_masks, level_of, make_level_bank, masks_at_level
from jaxdesens.masks.ops import apply_mask, mask_ratio

__all__ = [
    "LEVELS",
    "LEVEL_RANGES",
    "StrokeParams",
    "StrokeRanges",
    "apply_mask",
    "draw_strokes",
    "level_masks",
    "level_of",
    "load_mask",
    "make_level_bank",
    "mask_ratio",
    "masks_at_level",
    "random_strokes",
    "rasterise_capsules",
    "sample_stroke_params",
    "save_mask",
]
