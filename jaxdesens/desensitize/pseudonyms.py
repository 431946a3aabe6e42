"""The owner's key, and the keyed names that replace original file and identity names.

Ids and pseudonyms are HMAC-SHA256 values under the owner's key file, which is never written to
the export or logged: the same key gives the same pseudonyms in every export, a key per recipient
stops recipients linking exports, and without the key a pseudonym reveals nothing of the name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from jaxdesens.data.errors import DataError
from jaxdesens.data.export_reader import FLAT_DIR, LAYOUT_FLAT, LAYOUT_IDENTITIES
from jaxdesens.data.images import is_image_file

ID_HEX, PSEUDONYM_HEX = 24, 16  # 96- and 64-bit HMAC prefixes: collisions are checked anyway


@dataclasses.dataclass(frozen=True)
class PlannedFile:
    source: Path
    id: str
    pseudonym: str | None  # None for flat input

    @property
    def rel(self) -> str:
        return f"{self.pseudonym or FLAT_DIR}/{self.id}.png"


def load_or_create_key(path: str | os.PathLike, log: Callable[[str], None] = print) -> bytes:
    """The owner's secret; a missing file is created with 256 random bits (mode 0600)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        log(f"created a new key file {path}: keep it private and never ship it; reuse it for the same "
            "pseudonyms in later exports (a different key per recipient stops them linking exports)")
    if not path.is_file():
        raise DataError(f"{path}: --key must be a file")
    key = path.read_bytes().strip()
    if len(key) < 16:
        raise DataError(f"{path}: the key file holds {len(key)} bytes; it needs at least 16 bytes of secret "
                        "(point --key at a new file name to have a 256-bit key created)")
    return key


def keyed_hex(key: bytes, domain: str, text: str, length: int) -> str:
    """HMAC-SHA256 under the owner's key, hex, truncated; `domain` separates ids from pseudonyms."""
    return hmac.new(key, domain.encode() + b"\0" + os.fsencode(text), hashlib.sha256).hexdigest()[:length]


def pseudonym(key: bytes, identity: str) -> str:
    return keyed_hex(key, "identity", identity, PSEUDONYM_HEX)


def file_id(key: bytes, relative_path: str) -> str:
    return keyed_hex(key, "file", relative_path, ID_HEX)


def plan_export(root: str | os.PathLike, key: bytes) -> tuple[str, list[PlannedFile], list[str]]:
    """(layout, files sorted by id, ignored entries) of an identity folder or a flat folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; --data must be an identity folder (one sub-folder per "
                        "identity) or a folder of images")
    ignored: list[str] = []
    loose, folders = [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = []
            for f in sorted(entry.iterdir()):
                (files if f.is_file() and is_image_file(f) else ignored).append(f)
            if files:
                folders.append((entry.name, files))
        elif entry.is_file() and is_image_file(entry):
            loose.append(entry)
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
        for name, files in folders:
            alias = pseudonym(key, name)
            plan += [PlannedFile(f, file_id(key, f.relative_to(root).as_posix()), alias) for f in files]
        if len({pseudonym(key, n) for n, _ in folders}) != len(folders):
            raise DataError("two identities got the same pseudonym (a 64-bit collision); use another --key")
    else:
        layout = LAYOUT_FLAT
        plan = [PlannedFile(f, file_id(key, f.relative_to(root).as_posix()), None) for f in loose]
    if len({p.id for p in plan}) != len(plan):
        raise DataError("two files got the same id (a 96-bit collision); use another --key")
    plan.sort(key=lambda p: p.id)
    return layout, plan, [str(p) for p in ignored]
