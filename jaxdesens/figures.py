"""Image grids for reports (rows of faces, masks, restorations), written with PIL."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """HW, HW1 or HW3 in [0, 1] (or uint8) -> HW3 uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def save_grid(path: str | Path, rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str] | None = None,
              scale: int = 2, pad: int = 4) -> None:
    """Saves rows of equally sized images as one PNG, with optional column labels on top."""
    tiles = [[to_uint8_rgb(img) for img in row] for row in rows]
    height, width = tiles[0][0].shape[:2]
    columns = max(len(row) for row in tiles)
    top = 14 if labels else 0
    canvas = Image.new("RGB", (columns * (width * scale + pad) + pad, top + len(tiles) * (height * scale + pad) + pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(labels or []):
        draw.text((pad + c * (width * scale + pad), 1), text, fill=(0, 0, 0))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            image = Image.fromarray(tile).resize((width * scale, height * scale), Image.Resampling.NEAREST)
            canvas.paste(image, (pad + c * (width * scale + pad), top + pad + r * (height * scale + pad)))
    canvas.save(path)
