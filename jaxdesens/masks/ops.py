"""The two definitions every masked number rests on: how much a mask hides, and what it leaves.

Masks are 1 = visible, 0 = hidden. Every reported ratio and every masked image or network input
in the project goes through these two functions, so a report cannot disagree with the tested
definition. Both work on NumPy arrays (on the host, results stay NumPy) and on JAX arrays
(also inside `jit`).
"""

from __future__ import annotations

from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np

Array = TypeVar("Array", np.ndarray, jax.Array)


def mask_ratio(masks: Array) -> Array:
    """Share of hidden pixels, `1 - mean(m)`, for (H, W), (N, H, W) or (N, H, W, 1) masks.

    The paper's Formula 2 writes P = |m|_1 / (h * w), but with 1 = visible that would be the
    kept share; the paper means the hidden share (its Table 3 reports 76% for a mostly hidden face).
    NumPy masks give float64 ratios, JAX masks float32.
    """
    xp = jnp if isinstance(masks, jax.Array) else np
    masks = xp.asarray(masks)
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if masks.ndim not in (2, 3):
        raise ValueError(f"mask_ratio expects (H, W), (N, H, W) or (N, H, W, 1), got shape {masks.shape}")
    return 1.0 - masks.mean(axis=(-2, -1), dtype=xp.float64 if xp is np else jnp.float32)


def apply_mask(images: Array, mask: Array) -> Array:
    """The paper's Hadamard product `x * m`: hidden pixels become exactly 0, in every channel.

    `images` are NHWC (or HWC); `mask` is (H, W) for all images, or (N, H, W, 1) / (1, H, W, 1) /
    (H, W, 1). The result keeps the images' dtype (uint8 images stay exact integers).
    """
    if mask.ndim == 2:
        mask = mask[:, :, None]
    if mask.ndim not in (3, 4) or mask.shape[-1] != 1 or mask.shape[-3:-1] != images.shape[-3:-1]:
        raise ValueError(f"a mask for images of shape {images.shape} must be (H, W), (H, W, 1) or (N, H, W, 1) "
                         f"with the images' H and W, got shape {mask.shape}")
    return images * mask.astype(images.dtype)
