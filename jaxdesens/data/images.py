"""Decoding one image file into the library's fixed-size array convention.

Every reader in the project goes through `load_image` (or `open_image`, for full resolution), so
all of them turn photos upright, handle deep greyscale and transparency, resize, crop and convert
colour the same way, and all of them refuse a corrupt, oversized or tiny file naming its path.
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


MIN_SIDE = 16  # px; stretching a shorter side below this up to the output gives a blur, not a face
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's decompression-bomb limit (~9,500 x 9,500)
_EXIF_TRANSPOSE = {  # EXIF Orientation tag -> the transpose that shows the image upright (as viewers do)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90}
_GREY_MODES = ("L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "1")


def _deep_grey_to_8bit(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """16-bit (and 32-bit int / float) greyscale as 8-bit, keeping its grey levels.

    PIL's own conversion clips every value above 255 to white. A maximum of 4095 or less is read
    as 12-bit data stored in a 16-bit file (how scanners and sensors write it, shown black by
    viewers); anything else as the full 16-bit range; float images with values in [0, 1] as such.
    """
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max(initial=0.0))
    if values.min(initial=0.0) < 0 or top > 65535:
        raise DataError(f"{path}: {image.mode} greyscale values span {values.min():g}..{top:g}; expected 0..65535 "
                        "(8/12/16-bit) or 0..1 (float)")
    scale = 255.0 if image.mode == "F" and top <= 1.0 else 255.0 / 4095 if top <= 4095 else 255.0 / 65535
    return Image.fromarray(np.round(values * scale).astype(np.uint8))


def _flatten_alpha(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """Transparent pixels become black (0, like hidden pixels) instead of showing the colour
    stored under them; a fully transparent image holds nothing to show and is refused."""
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"))
    if not alpha.any():
        raise DataError(f"{path}: fully transparent (alpha 0 everywhere); nothing visible to export or train on")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def open_image(path: str | os.PathLike, grey: bool, draft_size: int | None = None,
               min_side: int = MIN_SIDE) -> Image.Image:
    """Decodes `path` upright (EXIF orientation applied) as an 8-bit "L" or "RGB" image.

    Refuses, naming the file: images over Pillow's decompression-bomb limit, images under
    `min_side` pixels on their shorter side, fully transparent ones. `draft_size` lets the JPEG decoder scale down by up
    to 8 while both sides stay >= it, so a 40-Mpx photo costs a few MB, not a full raster.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise DataError(f"{path}: {width}x{height} = {width * height:,} pixels, over the decompression-bomb "
                                f"limit of {MAX_PIXELS:,} pixels; shrink it first")
            if min(width, height) < min_side:
                raise DataError(f"{path}: {width}x{height} pixels; an image needs at least {min_side} px on its "
                                "shorter side to hold a face (it would be stretched into a blur)")
            orientation = image.getexif().get(0x0112, 1)
            if draft_size and image.format == "JPEG":  # bounds both sides, so turning it later is safe
                image.draft("L" if grey else "RGB", (draft_size, draft_size))
            image.load()
            grey = grey or image.mode in _GREY_MODES
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                image = _deep_grey_to_8bit(image, path)
            elif "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
                image = _flatten_alpha(image, path)
            if orientation in _EXIF_TRANSPOSE:
                image = image.transpose(_EXIF_TRANSPOSE[orientation])
            return image.convert("L") if grey else image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: over the decompression-bomb limit of {MAX_PIXELS:,} pixels ({err}); "
                        "shrink it first") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: cannot read image ({err}); expected a file PIL can decode") from err


def load_image(path: str | os.PathLike, image_size: int, channels: int = 3) -> np.ndarray:
    """Reads `path` as a `(image_size, image_size, channels)` uint8 array (see `open_image`);
    an image under 16 px is refused only when it would be stretched (`image_size` larger).

    Greyscale sources are repeated to 3 channels when `channels == 3`; colour sources are
    converted to luminance when `channels == 1`.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    image = open_image(path, grey=channels == 1, draft_size=image_size, min_side=min(MIN_SIDE, image_size))
    array = np.asarray(resize_and_center_crop(image, image_size), dtype=np.uint8)
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
