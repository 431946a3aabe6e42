"""Occlusion sensitivity: hide one patch at a time and measure how much the true class suffers.

It is the ground truth for "what the recognizer uses" (Zeiler & Fergus): the rise of the clean
model's cross-entropy on the true class when a patch is hidden (set to 0, as a mask hides it).
It is also a saliency method of its own (`launch/search.py --saliency=occlusion`).

The work is the same kind as candidate scoring: many masks times a batch of images, so every
patch position of a batch of images is scored in one jitted call, `jax.vmap` over the patch masks,
with the masks of a call split over every local device like the search's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdesens import parallel
from jaxdesens.models.functional import Folded, forward


@jax.jit
def masked_cross_entropy(folded: Folded, images: jax.Array, labels: jax.Array, masks: jax.Array) -> jax.Array:
    """Cross-entropy of each image under each mask: `(M, B)` for masks `(M, H, W)`, images `(B, H, W, C)`."""

    def one(mask):
        logits = forward(folded, images * mask[None, :, :, None].astype(images.dtype))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    return jax.vmap(one)(masks)


def patch_starts(size: int, patch: int, stride: int) -> np.ndarray:
    """Patch offsets along one axis that cover every pixel (the last patch ends at the border)."""
    if not 0 < patch <= size:
        raise ValueError(f"occlusion patch {patch} must lie in [1, image side {size}]")
    if stride < 1:
        raise ValueError(f"occlusion stride must be >= 1, got {stride}")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return np.asarray(starts)


def patch_masks(shape: tuple[int, int], patch: int, stride: int) -> np.ndarray:
    """One mask per patch position `(P, H, W)`: 0 on the patch (hidden), 1 elsewhere."""
    height, width = shape
    masks = []
    for top in patch_starts(height, patch, stride):
        for left in patch_starts(width, patch, stride):
            mask = np.ones(shape, np.float32)
            mask[top:top + patch, left:left + patch] = 0.0
            masks.append(mask)
    return np.stack(masks)


def occlusion_maps(folded: Folded, images: np.ndarray, labels: np.ndarray, *, patch: int = 8, stride: int = 4,
                   batch_size: int = 16, chunk: int = 64) -> np.ndarray:
    """Per-image occlusion maps `(N, H, W)`: each pixel gets the mean CE rise (nats) of the patches
    that cover it. `images` are uint8 or [0, 1] floats; `labels` the recognizer's classes."""
    masks = patch_masks(images.shape[1:3], patch, stride)
    hidden = 1.0 - masks
    coverage = hidden.sum(0)
    mesh = parallel.make_mesh(jax.local_devices())
    chunk = -(-min(chunk, len(masks)) // mesh.size) * mesh.size  # whole shares per device
    padded = np.concatenate([masks, np.ones((-len(masks) % chunk, *masks.shape[1:]), np.float32)])
    calls = [jax.device_put(jnp.asarray(padded[i:i + chunk]), parallel.batch_sharded(mesh))
             for i in range(0, len(padded), chunk)]
    dtype = folded["stem"]["w"].dtype
    folded = parallel.put_replicated(folded, mesh)
    unmasked = parallel.put_replicated(jnp.ones((1, *masks.shape[1:]), jnp.float32), mesh)
    out = np.zeros(images.shape[:3], np.float32)
    for start in range(0, len(images), batch_size):
        x = jnp.asarray(images[start:start + batch_size], jnp.float32)
        x = (x / 255.0 if images.dtype == np.uint8 else x).astype(dtype)
        y = jnp.asarray(labels[start:start + batch_size], jnp.int32)
        x, y = parallel.put_replicated((x, y), mesh)
        base = masked_cross_entropy(folded, x, y, unmasked)
        ce = np.concatenate([np.asarray(masked_cross_entropy(folded, x, y, m)) for m in calls])[:len(masks)]
        rises = ce - np.asarray(base)
        out[start:start + len(rises[0])] = np.einsum("pb,phw->bhw", rises, hidden) / coverage
    return out


def default_patch(image_side: int) -> int:
    """An eighth of the image side (8 px at 64 px): about one facial feature (an eye, the nose tip)."""
    return max(2, image_side // 8)
