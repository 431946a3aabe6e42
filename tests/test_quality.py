"""Desensitization operators, SSIM/PSNR (cross-checked with scikit-image) and inpainting attacks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from jaxdesens.desensitize import apply_mask, desensitize, gaussian_blur, mosaic, paper_sizes
from jaxdesens.metrics import dssim, psnr, ssim
from jaxdesens.metrics.attacks import ATTACK_METHODS, inpaint, restoration_report

# dm-pix SSIM uses 'VALID' windows; scikit-image filters with reflect padding and then drops a
# (11 - 1) // 2 = 5 pixel border before averaging, so both average the same window positions and
# differ only by float32 (dm-pix) vs float64 (scikit-image): measured <= 1.5e-6 in SSIM, 3e-6 dB.
SSIM_ATOL = 1e-5
PSNR_ATOL = 1e-4


def _smooth(n: int = 2, h: int = 24, w: int = 28) -> np.ndarray:
    """Smooth colour images: low-frequency waves, different per image and channel."""
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    images = [
        np.stack([0.5 + 0.4 * np.sin((3 + i + c) * xx + 2 * c) * np.cos((2 + c) * yy + i) for c in range(3)], -1)
        for i in range(n)
    ]
    return np.stack(images).astype(np.float32)


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _centre_hole(h: int, w: int) -> np.ndarray:
    mask = np.ones((h, w), np.float32)
    mask[h // 3 : 2 * h // 3, w // 4 : 3 * w // 4] = 0.0
    return mask


def _skimage(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = [
        structural_similarity(
            x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1
        )
        for x, y in zip(a, b)
    ]
    p = [peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a, b)]
    return np.array(s), np.array(p)


def _pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    noise = _noise((3, 20, 26, 3))
    noisy = np.clip(noise + 0.1 * _noise(noise.shape, seed=1) - 0.05, 0, 1)
    smooth = _smooth()
    return [
        (noise, noisy),
        (noise, noise * 0.5),
        (smooth, np.asarray(mosaic(smooth, 4))),
        (smooth, np.asarray(gaussian_blur(smooth, 5))),
        (smooth, np.asarray(apply_mask(smooth, _centre_hole(24, 28)))),
    ]


@pytest.mark.parametrize("index", range(5))
def test_ssim_psnr_match_skimage(index: int) -> None:
    a, b = _pairs()[index]
    ref_ssim, ref_psnr = _skimage(a, b)
    np.testing.assert_allclose(np.asarray(ssim(a, b)), ref_ssim, atol=SSIM_ATOL)
    np.testing.assert_allclose(np.asarray(dssim(a, b)), 1 - ref_ssim, atol=SSIM_ATOL)
    np.testing.assert_allclose(np.asarray(psnr(a, b)), ref_psnr, atol=PSNR_ATOL)


def test_identical_images() -> None:
    x = _noise((2, 16, 16, 3))
    np.testing.assert_allclose(np.asarray(ssim(x, x)), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dssim(x, x)), 0.0, atol=1e-6)
    assert np.all(np.isinf(np.asarray(psnr(x, x))))
    assert np.asarray(ssim(x[0], x[0])).shape == ()


def test_ssim_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="at least 11"):
        ssim(_noise((1, 8, 8, 3)), _noise((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="one shape"):
        psnr(_noise((1, 16, 16, 3)), _noise((1, 16, 17, 3)))


def test_mask_hides_exactly() -> None:
    x = _noise((2, 12, 14, 3)) + 0.01
    m = _centre_hole(12, 14)
    for mask in (m, np.broadcast_to(m[None, ..., None], (2, 12, 14, 1))):
        out = np.asarray(apply_mask(x, mask))
        hidden = m == 0
        assert np.all(out[:, hidden] == 0)
        np.testing.assert_array_equal(out[:, ~hidden], x[:, ~hidden])
    np.testing.assert_array_equal(np.asarray(apply_mask(x[0], m)), np.asarray(apply_mask(x, m))[0])


def test_blur_constant_mean_and_identity() -> None:
    const = np.full((1, 16, 16, 3), 0.3, np.float32)
    x = _noise((2, 16, 20, 3))
    for k in (3, 4, 9, 18):
        np.testing.assert_allclose(np.asarray(gaussian_blur(const, k)), 0.3, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gaussian_blur(x, k)).mean(), x.mean(), atol=0.01)
    np.testing.assert_allclose(np.asarray(gaussian_blur(x, 1)), x, atol=1e-7)
    assert gaussian_blur(x[0], 4).shape == x[0].shape


def test_blur_reduces_high_frequencies() -> None:
    x = _noise((2, 24, 24, 3))

    def energy(images: np.ndarray) -> float:
        return float(np.square(np.diff(images, axis=1)).mean() + np.square(np.diff(images, axis=2)).mean())

    energies = [energy(np.asarray(gaussian_blur(x, k))) for k in (1, 3, 9)]
    assert energies[0] > 2 * energies[1] > 2 * energies[2]


def test_blur_matches_opencv_for_odd_kernels() -> None:
    x = _noise((1, 15, 17, 3))
    for k in (3, 9):
        sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
        ref = cv2.GaussianBlur(x[0], (k, k), sigma, borderType=cv2.BORDER_REFLECT_101)
        np.testing.assert_allclose(np.asarray(gaussian_blur(x, k))[0], ref, atol=1e-5)


def test_mosaic_blocks() -> None:
    x = _noise((2, 16, 16, 3))
    out = np.asarray(mosaic(x, 4))
    cells = out.reshape(2, 4, 4, 4, 4, 3)
    # constant within a cell
    np.testing.assert_allclose(cells, np.broadcast_to(cells[:, :, :1, :, :1], cells.shape), atol=1e-6)
    np.testing.assert_allclose(
        cells[:, :, 0, :, 0], x.reshape(2, 4, 4, 4, 4, 3).mean(axis=(2, 4)), atol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(mosaic(x, 1)), x)


def test_mosaic_partial_cells() -> None:
    x = _noise((1, 10, 13, 3))
    out = np.asarray(mosaic(x[0], 4))
    assert out.shape == x[0].shape
    for rows, cols in ((slice(8, None), slice(12, None)), (slice(8, None), slice(0, 4))):  # 2x1, 2x4 cells
        cell = out[rows, cols]
        np.testing.assert_allclose(cell, np.broadcast_to(x[0, rows, cols].mean(axis=(0, 1)), cell.shape), atol=1e-6)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), x[0].mean(axis=(0, 1)), atol=1e-6)  # real pixels only


def test_desensitize_dispatch_and_errors() -> None:
    x = _noise((1, 16, 16, 3))
    m = _centre_hole(16, 16)
    np.testing.assert_array_equal(np.asarray(desensitize(x, "mask", mask=m)), np.asarray(apply_mask(x, m)))
    np.testing.assert_array_equal(np.asarray(desensitize(x, "blur", size=3)), np.asarray(gaussian_blur(x, 3)))
    np.testing.assert_array_equal(np.asarray(desensitize(x, "mosaic", size=4)), np.asarray(mosaic(x, 4)))
    with pytest.raises(ValueError, match="pixelate"):
        desensitize(x, "pixelate", size=4)
    with pytest.raises(ValueError, match="blur.*size"):
        desensitize(x, "blur")
    with pytest.raises(ValueError, match="mosaic.*0"):
        desensitize(x, "mosaic", size=0)
    with pytest.raises(ValueError, match="mask"):
        desensitize(x, "mask")


def test_paper_sizes_scale() -> None:
    assert paper_sizes(112) == {"blur": (9, 18), "mosaic": (8, 16)}
    assert paper_sizes(224) == {"blur": (18, 36), "mosaic": (16, 32)}
    assert paper_sizes(16) == {"blur": (2, 3), "mosaic": (2, 3)}


@pytest.mark.parametrize("method", ATTACK_METHODS)
def test_inpainting_restores_smooth_images(method: str) -> None:
    x = _smooth(h=24, w=24)
    m = _centre_hole(24, 24)
    masked = np.asarray(apply_mask(x, m))
    restored = inpaint(masked, m[None, ..., None].repeat(2, 0), method)
    hidden = m == 0
    assert np.all(np.abs(restored[:, hidden] - masked[:, hidden]).max(axis=-1) > 0)
    np.testing.assert_allclose(restored[:, ~hidden], masked[:, ~hidden], atol=1 / 255)
    assert np.all(np.asarray(psnr(x, restored)) > np.asarray(psnr(x, masked)) + 10)


def test_restoration_report() -> None:
    x = _smooth(n=3, h=16, w=16)
    m = _centre_hole(16, 16)
    masked = np.asarray(apply_mask(x, m))
    report = restoration_report(x, masked, m, ("telea", "navier-stokes"), batch=2, max_images=2)
    np.testing.assert_array_equal(report["indices"], [0, 1])
    for stats in report["methods"].values():
        assert stats["restored"].shape == (2, 16, 16, 3)
        assert stats["psnr_mean"] > report["baseline"]["psnr_mean"]
        assert stats["ssim_mean"] > report["baseline"]["ssim_mean"]


def test_attack_bad_method() -> None:
    x = _smooth(n=1, h=16, w=16)
    m = _centre_hole(16, 16)
    with pytest.raises(ValueError, match="deepfill"):
        inpaint(x, m, "deepfill")
    with pytest.raises(ValueError, match="deepfill"):
        restoration_report(x, x, m, ("telea", "deepfill"))
