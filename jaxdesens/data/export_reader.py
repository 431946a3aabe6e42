"""Reading a desensitized export (written by `jaxdesens.desensitize.export`) for training.

An export is what a data owner hands over: `manifest.json`, the mask `mask.png` (255 = visible)
and `<pseudonym>/<id>.png` masked images. The receiver trains an FSM model on it with
`launch/train.py --model=fsm --data=EXPORT`: `read_export` returns an `IdentitySet` whose `mask`
is the export's mask, so no `--mask` is needed.

The manifest is treated as untrusted input: file entries must be plain `<hex>/<hex>.png` paths
inside the export (no `..`, no absolute paths), each file's digest is checked by default, and a
file the manifest does not list (say, an original photo dropped in) makes the export refused.

Digests (format 2) are HMAC-SHA256 of the file's bytes keyed by a salt the manifest carries: the
receiver, who has no key, verifies with that salt, and two exports under different owner keys
(different salts) share no digest, so their manifests cannot be joined by digest. Format 1
exports (plain sha256 per file) are still read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxdesens.data.errors import DataError
from jaxdesens.data.identity import IdentitySet
from jaxdesens.data.images import load_images

FORMAT = "jaxdesens-export/2"
PLAIN_SHA256_FORMAT = "jaxdesens-export/1"  # before keyed digests; still readable
DIGEST_ALGORITHM = "hmac-sha256"
SALT_HEX = 32  # 128-bit salt
MANIFEST = "manifest.json"
MASK_FILE = "mask.png"
REPORT_JSON = "privacy_report.json"
REPORT_MD = "privacy_report.md"
FLAT_DIR = "images"
LAYOUT_IDENTITIES, LAYOUT_FLAT = "identities", "flat"
_HEX = re.compile(r"[0-9a-f]{8,64}")


def is_export(path: str | os.PathLike) -> bool:
    """True for a finished export: `manifest.json` and `mask.png` present (a blur/mosaic export
    has no mask and reads as a plain identity folder)."""
    path = Path(path)
    return (path / MANIFEST).is_file() and (path / MASK_FILE).is_file()


def _hash_file(path: str | os.PathLike, digest) -> str:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return _hash_file(path, hashlib.sha256())


def keyed_digest(salt: str, data: bytes) -> str:
    """HMAC-SHA256 of `data` keyed by the hex `salt`: what a format-2 manifest lists per file."""
    return hmac.new(bytes.fromhex(salt), data, hashlib.sha256).hexdigest()


def keyed_digest_file(salt: str, path: str | os.PathLike) -> str:
    return _hash_file(path, hmac.new(bytes.fromhex(salt), digestmod=hashlib.sha256))


def file_digest(manifest: dict[str, Any], where: str | os.PathLike = MANIFEST) -> tuple[str, Callable[[Path], str]]:
    """(the manifest's per-file digest field, the function that recomputes it from a file)."""
    if manifest.get("format") == PLAIN_SHA256_FORMAT:
        return "sha256", sha256_file
    spec = manifest.get("digest")
    salt = spec.get("salt") if isinstance(spec, dict) else None
    if (not isinstance(spec, dict) or spec.get("algorithm") != DIGEST_ALGORITHM or not isinstance(salt, str)
            or re.fullmatch(f"[0-9a-f]{{{SALT_HEX}}}", salt) is None):
        raise DataError(f"{where}: the manifest's digest must be {{'algorithm': {DIGEST_ALGORITHM!r}, 'salt': "
                        f"{SALT_HEX} hex digits}}, got {spec!r}")
    return "digest", lambda path: keyed_digest_file(salt, path)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path / MANIFEST}: cannot read the export manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, PLAIN_SHA256_FORMAT):
        raise DataError(f"{path / MANIFEST}: not a jaxdesens export manifest (format "
                        f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r} "
                        f"or {PLAIN_SHA256_FORMAT!r})")
    return manifest


def _checked_entry(root: Path, entry: Any, flat: bool) -> tuple[Path, str]:
    """The file of a manifest entry, refusing anything but `<pseudonym>/<id>.png` (or `images/<id>.png`)."""
    try:
        rel, pseudonym, ident = entry["path"], entry.get("pseudonym"), entry["id"]
    except (TypeError, KeyError) as err:
        raise DataError(f"{root / MANIFEST}: malformed file entry {entry!r}") from err
    folder = FLAT_DIR if flat else pseudonym
    ok = (isinstance(ident, str) and _HEX.fullmatch(ident) is not None and isinstance(folder, str)
          and (flat or _HEX.fullmatch(folder) is not None) and rel == f"{folder}/{ident}.png")
    if not ok:
        raise DataError(f"{root / MANIFEST}: file entry {rel!r} is not <pseudonym>/<id>.png; refusing to read it")
    return root / folder / f"{ident}.png", folder


def read_export(path: str | os.PathLike, image_size: int, channels: int = 3, progress: bool = False,
                verify: bool = True) -> IdentitySet:
    """Decodes an export into memory with its mask (1 = visible) and pseudonymous identities.

    Images are resized/cropped to `image_size` by the same `load_image` as any identity folder;
    the mask is resized with nearest neighbour when `image_size` differs from the export's (the
    training step multiplies images by the mask again, so resized hidden pixels stay 0).
    `verify` checks every file's digest (and the mask's) against the manifest.
    """
    from jaxdesens.masks.io import load_mask

    root = Path(path)
    manifest = read_manifest(root)
    field, digest = file_digest(manifest, root / MANIFEST)
    if manifest.get("layout") != LAYOUT_IDENTITIES:
        raise DataError(f"{root}: a flat export (no identities, layout {manifest.get('layout')!r}); "
                        "a recognizer needs an export made from an identity folder")
    mask = load_mask(root / MASK_FILE)
    if mask.shape[0] != mask.shape[1]:
        raise DataError(f"{root / MASK_FILE}: mask is {mask.shape[0]}x{mask.shape[1]}; an export's mask must be square")
    recorded = manifest.get("mask") or {}
    if list(mask.shape) != list(recorded.get("shape", mask.shape)):
        raise DataError(f"{root / MASK_FILE}: {mask.shape} but the manifest records {recorded.get('shape')}")
    if verify and recorded.get(field) and digest(root / MASK_FILE) != recorded[field]:
        raise DataError(f"{root / MASK_FILE}: digest differs from the manifest; the export was altered")
    if image_size != mask.shape[0]:
        mask = load_mask(root / MASK_FILE, image_size)
    if not mask.any():
        raise DataError(f"{root / MASK_FILE}: the mask hides every pixel at --image_size={image_size}")

    files, folders = [], []
    for entry in manifest.get("files", []):
        file, folder = _checked_entry(root, entry, flat=False)
        if not file.is_file():
            raise DataError(f"{file}: listed in the manifest but missing; the export is incomplete")
        if verify and digest(file) != entry.get(field):
            raise DataError(f"{file}: digest differs from the manifest; the export was altered or truncated")
        files.append(file)
        folders.append(folder)
    if not files:
        raise DataError(f"{root}: the manifest lists no files")
    listed = {MANIFEST, MASK_FILE, REPORT_JSON, REPORT_MD} | {f.relative_to(root).as_posix() for f in files}
    extra = sorted(rel for rel in (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
                   if rel not in listed)
    if extra:
        raise DataError(f"{root}: holds {len(extra)} file(s) not listed in the manifest (e.g. {extra[0]}); the export "
                        "was altered after it was made: ask the data owner for an intact copy")
    names = tuple(sorted(set(folders)))
    lookup = {name: i for i, name in enumerate(names)}
    labels = np.asarray([lookup[f] for f in folders], np.int32)
    images = load_images(files, image_size, channels, progress=progress)
    fingerprint = str(manifest.get("fingerprint") or hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()[:16])
    return IdentitySet(images, labels, names, fingerprint, source=str(root), mask=mask.astype(np.float32))
