"""Classical inpainting attacks: how much of a masked image can be restored (paper Sec. 4.2, Table 6).

The paper restores with RFR-Net; these training-free inpainters are a cheap, reproducible lower
bound on what an attacker recovers. Host side (NumPy): OpenCV and scikit-image are imported
lazily so the package still imports where they are missing. Images are NHWC float in [0, 1];
masks are (H, W) or (N, H, W, 1) with 1 = visible, so the pixels TO FILL are `mask == 0`.
"""

from __future__ import annotations

import numpy as np

from jaxdesens.metrics.quality import psnr, ssim

ATTACK_METHODS = ("biharmonic", "navier-stokes", "telea")
_CV2_FLAGS = {"navier-stokes": "INPAINT_NS", "telea": "INPAINT_TELEA"}


def _hidden(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-image boolean (N, H, W) of hidden pixels."""
    mask = np.asarray(mask)
    if mask.ndim == 4:
        mask = mask[..., 0]
    return np.broadcast_to(mask < 0.5, (shape[0], *shape[1:3])).copy()  # scikit-image needs a writeable mask


def _inpaint_one(image: np.ndarray, hidden: np.ndarray, method: str, radius: int) -> np.ndarray:
    if method == "biharmonic":
        from skimage.restoration import inpaint_biharmonic

        return inpaint_biharmonic(image, hidden, channel_axis=-1)
    import cv2

    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    filled = cv2.inpaint(pixels, hidden.astype(np.uint8) * 255, radius, getattr(cv2, _CV2_FLAGS[method]))
    return filled.reshape(image.shape).astype(np.float32) / 255.0


def inpaint(
    images: np.ndarray, mask: np.ndarray, method: str, *, radius: int = 3, progress: bool = False
) -> np.ndarray:
    """Fills the hidden pixels of each image with `method`; visible pixels are returned unchanged.

    One image at a time (biharmonic solves a sparse system per image and is slow on large ones).
    `radius` is OpenCV's inpaintRadius (ignored by biharmonic). OpenCV works on uint8 and takes 1
    or 3 channels; its output is composited back so that only hidden pixels are quantised.
    """
    if method not in ATTACK_METHODS:
        raise ValueError(f"unknown inpainting method {method!r}; expected one of {ATTACK_METHODS}")
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC, got shape {images.shape}")
    if method != "biharmonic" and images.shape[-1] not in (1, 3):
        raise ValueError(f"{method!r} (OpenCV) needs 1 or 3 channels, got {images.shape[-1]}")
    hidden = _hidden(mask, images.shape)
    out = images.copy()
    indices = range(len(images))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"inpaint {method}", unit="img")
    for i in indices:
        if hidden[i].any():
            filled = _inpaint_one(images[i], hidden[i], method, radius)
            out[i][hidden[i]] = filled[hidden[i]]
    return out


def _quality(originals: np.ndarray, images: np.ndarray, batch: int) -> dict[str, float]:
    """Mean/std PSNR and SSIM, computed on device in chunks of `batch` images to bound memory."""
    chunks = range(0, len(originals), batch)
    p = np.concatenate([np.asarray(psnr(originals[i : i + batch], images[i : i + batch])) for i in chunks])
    s = np.concatenate([np.asarray(ssim(originals[i : i + batch], images[i : i + batch])) for i in chunks])
    return {"psnr_mean": float(p.mean()), "psnr_std": float(p.std()),
            "ssim_mean": float(s.mean()), "ssim_std": float(s.std())}


def restoration_report(
    originals: np.ndarray,
    masked: np.ndarray,
    mask: np.ndarray,
    methods: tuple[str, ...] = ATTACK_METHODS,
    *,
    batch: int = 256,
    max_images: int | None = None,
    progress: bool = False,
    radius: int = 3,
) -> dict:
    """Runs each attack and scores restored vs original, next to the masked-vs-original baseline.

    `max_images` keeps an evenly spaced, deterministic subset (datasets are often sorted by
    identity, so the first k would be one person). Returns
    `{"indices": (K,), "baseline": stats, "methods": {name: stats | {"restored": (K,H,W,C)}}}`
    where stats are `psnr_mean/psnr_std/ssim_mean/ssim_std`; the restored images let a caller
    run a recognizer on them. PSNR is +inf for a perfect restoration (e.g. an all-visible mask).
    """
    bad = [m for m in methods if m not in ATTACK_METHODS]
    if bad:
        raise ValueError(f"unknown inpainting method(s) {bad}; expected some of {ATTACK_METHODS}")
    originals, masked = np.asarray(originals, np.float32), np.asarray(masked, np.float32)
    if originals.shape != masked.shape:
        raise ValueError(f"originals {originals.shape} and masked {masked.shape} differ in shape")
    count = len(originals) if max_images is None else min(max_images, len(originals))
    if count < 1:
        raise ValueError(f"nothing to attack: {len(originals)} images, max_images={max_images}")
    indices = np.arange(count) * len(originals) // count
    mask = np.asarray(mask)
    if mask.ndim == 4:
        mask = mask[indices]
    originals, masked = originals[indices], masked[indices]
    report = {"indices": indices, "baseline": _quality(originals, masked, batch), "methods": {}}
    for method in methods:
        restored = inpaint(masked, mask, method, radius=radius, progress=progress)
        report["methods"][method] = {**_quality(originals, restored, batch), "restored": restored}
    return report
