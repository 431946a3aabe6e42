"""Identity-labelled image sets held in memory, and the reader for identity folders.

An identity folder has one sub-folder per person (AT&T `s1/1.pgm`, VGGFace2
`n000001/0001_01.jpg`); any file PIL reads counts as an image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from jaxdesens.data.errors import DataError
from jaxdesens.data.images import is_image_file, load_images


@dataclasses.dataclass(frozen=True)
class IdentitySet:
    """Images `(N, S, S, C)` uint8 with integer identity `labels` indexing `names`.

    `fingerprint` identifies the source data, so a resumed run can refuse different data.
    `mask` is set when the set is a desensitized export that ships its own mask (1 = visible).
    """

    images: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    fingerprint: str
    source: str
    mask: np.ndarray | None = None

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, C) uint8, got {self.images.shape} {self.images.dtype}")
        if len(self.labels) != len(self.images):
            raise ValueError("images and labels differ in length")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, identities: np.ndarray, relabel: bool = True) -> IdentitySet:
        """Keeps only the given identity indices; with `relabel` they become 0..k-1 in that order."""
        identities = np.asarray(identities)
        keep = np.isin(self.labels, identities)
        labels = self.labels[keep]
        names = self.names
        if relabel:
            lookup = np.full(len(self.names), -1, np.int64)
            lookup[identities] = np.arange(len(identities))
            labels = lookup[labels]
            names = tuple(self.names[i] for i in identities)
        return dataclasses.replace(self, images=self.images[keep], labels=labels.astype(np.int32), names=names)

    def take(self, indices: np.ndarray) -> IdentitySet:
        """Keeps the given image indices with the same label space."""
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices])


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """The files of an identity folder, before decoding."""

    root: Path
    paths: tuple[Path, ...]
    labels: np.ndarray
    names: tuple[str, ...]

    def fingerprint(self) -> str:
        """Hash of relative paths, sizes and identities: cheap even for millions of files."""
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels):
            digest.update(f"{path.relative_to(self.root)}\0{path.stat().st_size}\0{self.names[label]}\n".encode())
        return digest.hexdigest()[:16]


def scan_identity_folder(root: str | os.PathLike, min_identities: int = 2) -> FolderIndex:
    """Lists images per identity sub-folder, sorted, with clear errors for unusable layouts."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder; expected a folder with one sub-folder per identity")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected a folder with one sub-folder per identity")
    names, paths, labels = [], [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.iterdir() if p.is_file() and is_image_file(p))
        if not files:
            continue
        labels.extend([len(names)] * len(files))
        paths.extend(files)
        names.append(sub.name)
    if not names:
        loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
        hint = (f" ({len(loose)} images lie directly in it: put each identity's images in its own sub-folder)"
                if loose else "")
        raise DataError(f"{root}: no identity sub-folders with images found{hint}")
    if len(names) < min_identities:
        raise DataError(f"{root}: found {len(names)} identity folder(s) with images; need at least {min_identities}")
    return FolderIndex(root, tuple(paths), np.asarray(labels, np.int32), tuple(names))


def read_identity_folder(root: str | os.PathLike, image_size: int, channels: int = 3,
                         progress: bool = False) -> IdentitySet:
    """Decodes a whole identity folder into memory (fine up to a few hundred thousand small faces)."""
    index = scan_identity_folder(root)
    images = load_images(list(index.paths), image_size, channels, progress=progress)
    return IdentitySet(images, index.labels, index.names, index.fingerprint(), source=str(index.root))


def describe(dataset: IdentitySet) -> str:
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    return json.dumps({"source": dataset.source, "images": len(dataset), "identities": dataset.num_classes,
                       "per_identity_min": int(counts.min()), "per_identity_max": int(counts.max()),
                       "shape": list(dataset.image_shape)})
