"""Mask files: a PNG to look at and a .npy to compute with, written atomically.

A searched mask is the product of Algorithm 1 that clients download (federated Step II), so a
half-written file must never be visible: each file goes to a temp name and is `os.replace`d.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxdesens.errors import DataError

_SUFFIXES = (".png", ".npy")


def _binary_2d(mask: np.ndarray, where: str) -> np.ndarray:
    """(H, W) float32 0/1 from (H, W) or (H, W, 1), or ValueError naming `where`."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"{where}: a mask must be (H, W) or (H, W, 1), got shape {mask.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{where}: mask values must be 0 (hidden) or 1 (visible)")
    return mask.astype(np.float32)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared mask must stay readable
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_mask(path: str | os.PathLike, mask: np.ndarray) -> tuple[Path, Path]:
    """Writes `<stem>.png` (255 = visible, 0 = hidden) and `<stem>.npy` (float32 0/1).

    `path` may end in .png, .npy or neither. Returns the two paths written.
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in _SUFFIXES else path
    mask = _binary_2d(mask, str(path))
    png, npy = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.npy"
    stem.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(png, lambda f: Image.fromarray((mask * 255).astype(np.uint8)).save(f, format="PNG"))
    _atomic_write(npy, lambda f: np.save(f, mask))
    return png, npy


def _resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour keeps the mask binary (interpolation would create grey edges)."""
    height, width = size
    rows = ((np.arange(height) + 0.5) * mask.shape[0] / height).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * mask.shape[1] / width).astype(np.int64)
    return mask[rows[:, None], cols[None, :]]


def load_mask(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Reads a .png (any mode; >= 128 is visible) or .npy mask as (H, W) float32 0/1.

    `size` (int, or (height, width)) resizes with nearest neighbour. Bad files raise `DataError`
    naming the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(f"{path}: unknown mask suffix {path.suffix!r}; use .png or .npy")
    if not path.is_file():
        raise DataError(f"{path}: mask file not found")
    try:
        if suffix == ".png":
            with Image.open(path) as image:
                mask = (np.asarray(image.convert("L")) >= 128).astype(np.float32)
        else:
            mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: cannot read mask ({err})") from err
    try:
        mask = _binary_2d(mask, str(path))
    except ValueError as err:
        raise DataError(str(err)) from err
    if size is not None:
        mask = _resize_nearest(mask, (size, size) if isinstance(size, int) else tuple(size))
    return mask


def fingerprint(mask: np.ndarray) -> str:
    """Short content hash of a binary mask (shape and pixels), stored beside checkpoints."""
    import hashlib

    mask = _binary_2d(mask, "mask")
    return hashlib.sha256(repr(mask.shape).encode() + np.packbits(mask.astype(bool)).tobytes()).hexdigest()[:16]
