"""Decoding one image file into the library's fixed-size array convention.

Every reader in the project goes through `load_image`, so all of them resize, crop and convert
colour the same way and all of them report a corrupt file with its path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxdesens.data.errors import DataError

# Extensions PIL can open; files without one of these are not treated as images.
IMAGE_EXTENSIONS = frozenset(
    ext.lower() for ext in Image.registered_extensions() if ext.lower() not in {".pdf", ".eps", ".ps"}
)


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scales the shorter side to `size`, then crops the centre square (aligned faces stay centred)."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: str | os.PathLike, image_size: int, channels: int = 3) -> np.ndarray:
    """Reads `path` as a `(image_size, image_size, channels)` uint8 array.

    Greyscale sources are repeated to 3 channels when `channels == 3`; colour sources are
    converted to luminance when `channels == 1`.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        with Image.open(path) as image:
            image.load()
            grey = channels == 1 or image.mode in ("L", "I", "I;16", "F", "1", "LA")
            image = image.convert("L") if grey else image.convert("RGB")
            image = resize_and_center_crop(image, image_size)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err}); expected a file PIL can decode") from err
    if array.ndim == 2:
        array = array[..., None]
    if channels == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def load_images(paths: list[str] | list[Path], image_size: int, channels: int = 3,
                progress: bool = False) -> np.ndarray:
    """Decodes many files in a thread pool (PIL releases the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    out = np.empty((len(paths), image_size, image_size, channels), np.uint8)

    def _one(i: int) -> None:
        out[i] = load_image(paths[i], image_size, channels)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        list(tqdm(pool.map(_one, range(len(paths))), total=len(paths), disable=not progress,
                  desc="decoding images", unit="img"))
    return out
