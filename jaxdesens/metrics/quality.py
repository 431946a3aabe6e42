"""Image-quality metrics between originals and desensitized/restored images (Tables 4, 6, 8).

Built on dm-pix so they run on device under `jit`; dm-pix is imported lazily because the GPU
benchmark machine lacks it and must still import `jaxdesens.metrics`. Inputs are NHWC (or HWC)
float images in [0, 1]; results are one value per image, shape (N,) (a scalar for HWC).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SSIM_WINDOW = 11  # dm-pix defaults = Wang et al. 2004: Gaussian window 11, sigma 1.5, k1 .01, k2 .03


def _check(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim not in (3, 4):
        raise ValueError(f"expected two NHWC/HWC images of one shape, got {a.shape} and {b.shape}")
    return a, b


@jax.jit
def _ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    import dm_pix

    return dm_pix.ssim(a, b, max_val=1.0, filter_size=SSIM_WINDOW, filter_sigma=1.5, k1=0.01, k2=0.03)


@jax.jit
def _psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    import dm_pix

    return dm_pix.psnr(a, b)


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean SSIM per image over the window positions that fit inside it (no border padding).

    Equals scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1.0, channel_axis=-1)`, which also drops a 5-pixel
    border. Images need at least `SSIM_WINDOW` pixels per side.
    """
    a, b = _check(a, b)
    if min(a.shape[-3:-1]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape}")
    return _ssim(a, b)


def dssim(a: jax.Array, b: jax.Array) -> jax.Array:
    """The paper's privacy score dSSIM = 1 - SSIM (not the (1 - SSIM) / 2 "distance" variant).

    Tables 4 and 8 use this form: 0 for an untouched image, larger = more hidden.
    """
    return 1.0 - ssim(a, b)


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    """PSNR in dB for data range 1.0; identical images give +inf (as scikit-image does)."""
    return _psnr(*_check(a, b))
