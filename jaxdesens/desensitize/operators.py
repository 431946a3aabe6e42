"""The three desensitization operators the paper compares (Section 4, Fig. 7): mask, blur, mosaic.

All operators are JAX, jittable (sizes are static) and take NHWC float images in [0, 1]; a single
HWC image is accepted too and comes back HWC. Mask convention: 1 = visible, 0 = hidden; the mask
operator is `masks.ops.apply_mask`, the project's one definition of `x * m`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxdesens.masks.ops import apply_mask

METHODS = ("mask", "blur", "mosaic")
_PAPER_SIZE = 112  # the face crops of the paper; Fig. 7's kernel sizes refer to this resolution
_PAPER_BLUR = (9, 18)
_PAPER_MOSAIC = (8, 16)
_MIN_SIZES = (2, 3)  # weak / strong size floors, so tiny images still get two distinct strengths


def _as_batch(images: jax.Array) -> tuple[jax.Array, bool]:
    images = jnp.asarray(images, jnp.float32)
    if images.ndim == 3:
        return images[None], True
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC or HWC, got shape {images.shape}")
    return images, False


def gaussian_kernel(kernel_size: int, sigma: float | None = None) -> jax.Array:
    """1-D normalised Gaussian taps at offsets `i - (k - 1) / 2`, as OpenCV's `getGaussianKernel`.

    `sigma=None` uses OpenCV's rule `0.3 * ((k - 1) * 0.5 - 1) + 0.8` (OpenCV swaps in fixed
    tables for k <= 7; the rule is used for every k here so that size alone sets the strength).
    """
    if kernel_size < 1:
        raise ValueError(f"blur kernel_size must be >= 1, got {kernel_size}")
    if sigma is None:
        sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    offsets = jnp.arange(kernel_size, dtype=jnp.float32) - (kernel_size - 1) / 2
    taps = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _blur_axis(images: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
    # An even kernel has no centre tap: output pixel i averages inputs i-(k-1)//2 .. i+k//2, i.e. it
    # is centred half a pixel towards the end of the axis.
    k, n = taps.shape[0], images.shape[axis]
    pad = [(0, 0)] * images.ndim
    pad[axis] = ((k - 1) // 2, k // 2)
    padded = jnp.pad(images, pad, mode="reflect")
    return sum(taps[i] * lax.slice_in_dim(padded, i, i + n, axis=axis) for i in range(k))


@partial(jax.jit, static_argnames=("kernel_size",))
def gaussian_blur(images: jax.Array, kernel_size: int, sigma: float | None = None) -> jax.Array:
    """Separable Gaussian blur with a `kernel_size` x `kernel_size` window (paper: 9 and 18 at 112 px).

    Borders use reflect padding without repeating the edge pixel (OpenCV's default
    BORDER_REFLECT_101), so a constant image stays constant and the image mean is kept closely.
    Odd kernels match `cv2.GaussianBlur`; even kernels (which OpenCV refuses) are centred half a
    pixel down/right, see `_blur_axis`. `kernel_size=1` is the identity.
    """
    batch, single = _as_batch(images)
    taps = gaussian_kernel(kernel_size, sigma)
    out = _blur_axis(_blur_axis(batch, taps, axis=1), taps, axis=2)
    return out[0] if single else out


@partial(jax.jit, static_argnames=("block",))
def mosaic(images: jax.Array, block: int) -> jax.Array:
    """Pixelation: every `block` x `block` cell (from the top-left) takes its mean colour.

    When H or W is not a multiple of `block`, the last partial cell is averaged over its real
    pixels only (zero padding is excluded from the count). `block=1` is the identity.
    """
    if block < 1:
        raise ValueError(f"mosaic block must be >= 1, got {block}")
    batch, single = _as_batch(images)
    n, h, w, c = batch.shape
    rows, cols = -(-h // block), -(-w // block)
    pad = ((0, 0), (0, rows * block - h), (0, cols * block - w), (0, 0))
    cells = jnp.pad(batch, pad).reshape(n, rows, block, cols, block, c)
    counts = jnp.pad(jnp.ones((1, h, w, 1), jnp.float32), pad).reshape(1, rows, block, cols, block, 1)
    means = cells.sum(axis=(2, 4), keepdims=True) / counts.sum(axis=(2, 4), keepdims=True)
    out = jnp.broadcast_to(means, cells.shape).reshape(n, rows * block, cols * block, c)[:, :h, :w]
    return out[0] if single else out


def paper_sizes(image_size: int) -> dict[str, tuple[int, int]]:
    """Fig. 7's (weak, strong) sizes rescaled from 112 px to `image_size`.

    Keeps the same strength relative to the face, so small test images are desensitized as much
    as the paper's; floors of 2 and 3 keep both sizes effective and distinct.
    """
    scale = image_size / _PAPER_SIZE

    def scaled(sizes: tuple[int, int]) -> tuple[int, int]:
        return tuple(max(floor, round(s * scale)) for s, floor in zip(sizes, _MIN_SIZES))

    return {"blur": scaled(_PAPER_BLUR), "mosaic": scaled(_PAPER_MOSAIC)}


def desensitize(
    images: jax.Array, method: str, *, mask: jax.Array | None = None, size: int | None = None
) -> jax.Array:
    """One entry point for the baselines: "mask" needs `mask`; "blur"/"mosaic" need `size`.

    `size` is the blur kernel size or the mosaic block; `paper_sizes(H)` gives the paper's values.
    """
    if method == "mask":
        if mask is None:
            raise ValueError('method "mask" needs mask= (1 = visible, 0 = hidden)')
        return apply_mask(jnp.asarray(images, jnp.float32), jnp.asarray(mask, jnp.float32))
    if method not in METHODS:
        raise ValueError(f"unknown desensitization method {method!r}; expected one of {METHODS}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f'method "{method}" needs an integer size >= 1 (see paper_sizes), got {size!r}')
    return gaussian_blur(images, size) if method == "blur" else mosaic(images, size)
