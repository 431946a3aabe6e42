"""The images of an export: metadata-free PNGs.

A PNG keeps only its IHDR, IDAT and IEND chunks, so no EXIF/GPS, ICC profile, XMP, thumbnail or
text chunk survives, whatever PIL would add. (Every file is written atomically by
`jaxdesens.paths.write_atomic`, so a killed export never leaves a half-written file.)
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALLOWED_PNG_CHUNKS = (b"IHDR", b"IDAT", b"IEND")


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk of a PNG, in order; ValueError for a malformed stream."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG stream")
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError("truncated PNG chunk")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        payload = data[pos + 8:pos + 8 + length]
        if len(payload) != length:
            raise ValueError("truncated PNG chunk")
        chunks.append((kind, payload))
        pos += 12 + length
        if kind == b"IEND":
            if pos != len(data):
                raise ValueError("bytes after IEND")
            break
    return chunks


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 (H, W), (H, W, 1) or (H, W, 3) array with only IHDR, IDAT, IEND.

    PIL encodes a fresh image made from the raw array (so it has no `info` to copy), and every
    chunk outside the whitelist is dropped afterwards: defence in depth against any default
    ancillary chunk (pHYs, sRGB, gAMA, tEXt, eXIf, iCCP, ...) a PIL version might add.
    """
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):
        raise ValueError(f"expected a greyscale or RGB array, got shape {pixels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    chunks = png_chunks(buffer.getvalue())
    return PNG_SIGNATURE + b"".join(_chunk(k, p) for k, p in chunks if k in ALLOWED_PNG_CHUNKS)
