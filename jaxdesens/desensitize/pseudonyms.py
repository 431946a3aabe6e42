"""The owner's key, and the keyed names that replace original file and identity names.

Ids and pseudonyms are HMAC-SHA256 values under the owner's key file, which is never written to
the export or logged: the same key gives the same pseudonyms in every export, and without the key
a pseudonym reveals nothing of the name. The manifest's digest salt is derived from the key too,
so a key per recipient gives each recipient other pseudonyms, ids and file digests. It does not
make exports unlinkable: their pixels are identical (one mask), so pooled exports can still be
joined image by image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxdesens.data.errors import DataError
from jaxdesens.data.export_reader import FLAT_DIR, LAYOUT_FLAT, LAYOUT_IDENTITIES, SALT_HEX
from jaxdesens.data.images import is_image_file
from jaxdesens.paths import is_inside

ID_HEX, PSEUDONYM_HEX = 24, 16  # 96- and 64-bit HMAC prefixes: collisions are checked anyway


@dataclasses.dataclass(frozen=True)
class PlannedFile:
    source: Path
    id: str
    pseudonym: str | None  # None for flat input

    @property
    def rel(self) -> str:
        return f"{self.pseudonym or FLAT_DIR}/{self.id}.png"


MIN_KEY_BITS = 96  # frequency estimate; a random 32-hex-digit (128-bit) key scores 98 or more


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """What an export will write: `files` sorted by id; `ignored` non-image entries; `symlinks`
    entries of --data that are links resolving outside it (followed, and named in the owner log)."""

    layout: str
    files: list[PlannedFile]
    ignored: list[str]
    symlinks: list[dict[str, str]]


def _make_private_folders(folder: Path) -> None:
    """Creates `folder` and any missing parent as 0700: a key's folder should not be listable by others."""
    for parent in [*reversed(folder.parents), folder]:
        if not parent.exists():
            parent.mkdir(mode=0o700)


def estimated_key_bits(key: bytes) -> float:
    """Bits of secret a key's characters can carry, by their frequencies, after undoing repetition:
    a key that repeats a shorter string counts as that string. It catches short, patterned or
    few-symbol keys; it cannot prove a key random (let the tool create it)."""
    period = next((p for p in range(1, len(key)) if key[p:] == key[:-p]), len(key))
    unit = key[:period]
    counts = np.bincount(np.frombuffer(unit, np.uint8), minlength=256)
    share = counts[counts > 0] / len(unit)
    return float(-(share * np.log2(share)).sum() * len(unit)) if len(unit) else 0.0


def load_or_create_key(path: str | os.PathLike, log: Callable[[str], None] = print) -> bytes:
    """The owner's secret; a missing file is created with 256 random bits (mode 0600, new
    folders 0700). Short or low-entropy keys are refused."""
    path = Path(path)
    if not path.exists():
        try:
            _make_private_folders(path.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
        except OSError as err:
            raise DataError(f"--key={path}: cannot create the key file ({err.strerror or err}); choose a path in a "
                            "folder you can write") from err
        log(f"created a new key file {path}: keep it private and never ship it; reuse it for the same "
            "pseudonyms in later exports (a key per recipient gives each other pseudonyms and digests, but the "
            "pixels stay identical, so pooled exports can still be linked image by image)")
    if not path.is_file():
        raise DataError(f"{path}: --key must be a file")
    try:
        key = path.read_bytes().strip()
    except OSError as err:
        raise DataError(f"--key={path}: cannot read the key file ({err.strerror or err})") from err
    hint = "point --key at a new file name to have a random 256-bit key created"
    if len(key) < 16:
        raise DataError(f"{path}: the key file holds {len(key)} bytes; it needs at least 16 bytes of secret ({hint})")
    bits = estimated_key_bits(key)
    if bits < MIN_KEY_BITS:
        raise DataError(f"{path}: a low-entropy key (its characters carry about {bits:.0f} bits, by their "
                        f"frequencies and repeats; at least {MIN_KEY_BITS} needed): {hint}")
    return key


def keyed_hex(key: bytes, domain: str, text: str, length: int) -> str:
    """HMAC-SHA256 under the owner's key, hex, truncated; `domain` separates ids from pseudonyms.

    `text` is NFC-normalised first: macOS writes names decomposed (NFD), most other systems
    composed (NFC), so one person copied between them keeps one pseudonym."""
    text = unicodedata.normalize("NFC", text)
    return hmac.new(key, domain.encode() + b"\0" + os.fsencode(text), hashlib.sha256).hexdigest()[:length]


def pseudonym(key: bytes, identity: str) -> str:
    return keyed_hex(key, "identity", identity, PSEUDONYM_HEX)


def file_id(key: bytes, relative_path: str) -> str:
    return keyed_hex(key, "file", relative_path, ID_HEX)


def digest_salt(key: bytes) -> str:
    """The public salt of the manifest's file digests (`export_reader.keyed_digest`).

    Derived from the key rather than drawn at random, so a resumed or repeated export under one key
    is byte-identical (those exports share pseudonyms anyway), while exports under different keys
    share no digest. Publishing it reveals nothing of the key (an HMAC output)."""
    return keyed_hex(key, "digest-salt", "", SALT_HEX)


def _same_spelling_twice(root: Path, names: list[str]) -> None:
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(unicodedata.normalize("NFC", name), name)
        if other != name:
            raise DataError(f"{root}: {other!r} and {name!r} are the same name in two Unicode spellings (NFC/NFD); "
                            "they would get one pseudonym or id: merge or rename one")


def _outside_link(entry: Path, root: Path) -> dict[str, str] | None:
    if not entry.is_symlink():
        return None
    target = entry.resolve()
    return None if is_inside(target, root) else {"path": str(entry), "target": str(target)}


def plan_export(root: str | os.PathLike, key: bytes) -> ExportPlan:
    """The files of an identity folder or a flat folder, with keyed ids and pseudonyms."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; --data must be an identity folder (one sub-folder per "
                        "identity) or a folder of images")
    ignored: list[Path] = []
    loose, folders, links = [], [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = []
            for f in sorted(entry.iterdir()):
                (files if f.is_file() and is_image_file(f) else ignored).append(f)
            if files:
                folders.append((entry.name, files))
                links += [link for link in (_outside_link(p, root) for p in [entry, *files]) if link]
        elif entry.is_file() and is_image_file(entry):
            loose.append(entry)
            links += [link for link in (_outside_link(entry, root),) if link]
        else:
            ignored.append(entry)
    if folders and loose:
        raise DataError(f"{root}: holds both identity sub-folders ({len(folders)}) and {len(loose)} loose images; "
                        "move the loose images into identity folders or export them separately")
    if not folders and not loose:
        raise DataError(f"{root}: no images found (expected identity sub-folders of images, or images)")
    plan = []
    if folders:
        layout = LAYOUT_IDENTITIES
        _same_spelling_twice(root, [name for name, _ in folders])
        for name, files in folders:
            _same_spelling_twice(root / name, [f.name for f in files])
            alias = pseudonym(key, name)
            plan += [PlannedFile(f, file_id(key, f.relative_to(root).as_posix()), alias) for f in files]
        if len({pseudonym(key, n) for n, _ in folders}) != len(folders):
            raise DataError("two identities got the same pseudonym (a 64-bit collision); use another --key")
    else:
        layout = LAYOUT_FLAT
        _same_spelling_twice(root, [f.name for f in loose])
        plan = [PlannedFile(f, file_id(key, f.relative_to(root).as_posix()), None) for f in loose]
    if len({p.id for p in plan}) != len(plan):
        raise DataError("two files got the same id (a 96-bit collision); use another --key")
    plan.sort(key=lambda p: p.id)
    return ExportPlan(layout, plan, [str(p) for p in ignored], links)
