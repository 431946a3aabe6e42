"""LFW verification pairs: the `pairs.txt` protocol file and the images it names.

View 2 `pairs.txt` starts with `folds<TAB>n` and then holds, per fold, `n` matched lines
`Name i j` followed by `n` mismatched lines `Name1 i Name2 j`. View 1 files
(`pairsDevTrain.txt`, `pairsDevTest.txt`) have a single-number header `n` and are one fold.
The fold layout is positional, so every line is checked against the section it must belong to:
a misplaced line would otherwise silently shift labels and folds. A matched line naming one image
twice, a mismatched line naming one person twice, and a name that is not one plain folder name
(`../Outside`) are refused with their line number.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from jaxdesens.data.errors import DataError
from jaxdesens.data.images import is_image_file, load_images
from jaxdesens.paths import is_inside

_INT = re.compile(r"\d+")
_MATCHED_FORM = "'Name<TAB>i<TAB>j'"
_MISMATCHED_FORM = "'Name1<TAB>i<TAB>Name2<TAB>j'"


@dataclasses.dataclass(frozen=True)
class LfwPairs:
    """Parsed pairs, one entry per pair in file order; `line` is the 1-based line in `path`."""

    left_name: np.ndarray
    left_index: np.ndarray
    right_name: np.ndarray
    right_index: np.ndarray
    issame: np.ndarray
    fold: np.ndarray
    line: np.ndarray
    path: Path

    def __len__(self) -> int:
        return len(self.issame)

    @property
    def num_folds(self) -> int:
        return int(self.fold.max()) + 1 if len(self) else 0


def _parse_header(path: Path, line: str) -> tuple[int, int]:
    fields = line.split()
    if not 1 <= len(fields) <= 2 or not all(_INT.fullmatch(f) and int(f) > 0 for f in fields):
        raise DataError(f"{path}:1: expected a header 'folds<TAB>pairs_per_class' (View 2, e.g. '10\\t300') "
                        f"or 'pairs_per_class' (View 1, e.g. '1100') with positive integers, got {line.strip()!r}")
    return (1, int(fields[0])) if len(fields) == 1 else (int(fields[0]), int(fields[1]))


def _index(path: Path, lineno: int, token: str) -> int:
    if not _INT.fullmatch(token) or int(token) < 1:
        raise DataError(f"{path}:{lineno}: expected a 1-based image number (integer >= 1), got {token!r}")
    return int(token)


def _name(path: Path, lineno: int, token: str) -> str:
    """A person's folder name: one plain path component, so no pair reads outside the root."""
    if token in (".", "..") or "/" in token or "\\" in token or "\0" in token:
        raise DataError(f"{path}:{lineno}: {token!r} is not a plain LFW name (one folder name under the root: no "
                        "'/', '\\' or '..')")
    return token


def _check_pair(path: Path, lineno: int, matched: bool, fields: list[str]) -> None:
    """A matched pair is two images of one person, a mismatched pair two people: anything else
    would be scored under the wrong label."""
    if matched and fields[1] == fields[3]:
        raise DataError(f"{path}:{lineno}: a matched pair names the same image twice ({fields[0]} {fields[1]}); "
                        "matched pairs are two different images of one person")
    if not matched and fields[0] == fields[2]:
        raise DataError(f"{path}:{lineno}: a mismatched pair names {fields[0]!r} twice; mismatched pairs are two "
                        "different people")


def parse_pairs(path: str | os.PathLike) -> LfwPairs:
    """Reads an LFW `pairs.txt` (View 2, or View 1 as a single fold), validating every line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read LFW pairs file ({err})") from err
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: empty file; expected an LFW pairs.txt with a header line")
    folds, per_class = _parse_header(path, lines[0])
    expected = folds * 2 * per_class
    body = lines[1:]
    if len(body) != expected:
        where = len(lines) + 1 if len(body) < expected else expected + 2
        raise DataError(f"{path}:{where}: header announces {folds} fold(s) x {per_class} matched + {per_class} "
                        f"mismatched = {expected} pair lines, but the file has {len(body)}")
    left_name, left_index, right_name, right_index = [], [], [], []
    for offset, text in enumerate(body):
        lineno = offset + 2
        matched = offset % (2 * per_class) < per_class
        fields = text.split()
        if len(fields) != (3 if matched else 4):
            fold = offset // (2 * per_class) + 1
            section, form = ("matched", _MATCHED_FORM) if matched else ("mismatched", _MISMATCHED_FORM)
            hint = {3: " (a matched line)", 4: " (a mismatched line)"}.get(len(fields), "")
            raise DataError(f"{path}:{lineno}: fold {fold} {section} section expects {form}, "
                            f"got {len(fields)} field(s){hint}: {text.strip()!r}")
        if matched:
            name, i, j = fields
            fields = [name, i, name, j]
        left_name.append(_name(path, lineno, fields[0]))
        left_index.append(_index(path, lineno, fields[1]))
        right_name.append(_name(path, lineno, fields[2]))
        right_index.append(_index(path, lineno, fields[3]))
        _check_pair(path, lineno, matched, [fields[0], str(left_index[-1]), fields[2], str(right_index[-1])])
    offsets = np.arange(expected)
    return LfwPairs(
        left_name=np.asarray(left_name, dtype=str), left_index=np.asarray(left_index, np.int32),
        right_name=np.asarray(right_name, dtype=str), right_index=np.asarray(right_index, np.int32),
        issame=offsets % (2 * per_class) < per_class, fold=(offsets // (2 * per_class)).astype(np.int32),
        line=(offsets + 2).astype(np.int32), path=path)


def lfw_image_path(root: str | os.PathLike, name: str, index: int) -> Path:
    """`root/Name/Name_0001.jpg`; if that is missing, the same stem with another image extension.

    Returns the `.jpg` path when no file exists, so the caller's error names the canonical file.
    """
    folder = Path(root) / name
    if not is_inside(folder, root) or folder.resolve() == Path(root).resolve():
        raise DataError(f"{name!r}: names a folder outside --lfw_root={root}; LFW names are plain folder names")
    stem = f"{name}_{index:04d}"
    canonical = folder / f"{stem}.jpg"
    if canonical.exists():
        return canonical
    others = sorted(p for p in folder.glob(f"{stem}.*") if is_image_file(p)) if folder.is_dir() else []
    return others[0] if others else canonical


def load_lfw_pairs(pairs_path: str | os.PathLike, root: str | os.PathLike, image_size: int,
                   channels: int = 3) -> tuple[np.ndarray, np.ndarray, LfwPairs]:
    """Decodes the images of every pair as uint8 NHWC arrays aligned with the pairs.

    Each distinct image is decoded once (LFW View 2 names 7,701 images in 12,000 slots).
    """
    pairs = parse_pairs(pairs_path)
    keys = list(zip(np.stack([pairs.left_name, pairs.right_name], 1).ravel().tolist(),
                    np.stack([pairs.left_index, pairs.right_index], 1).ravel().tolist()))
    slot: dict[tuple[str, int], int] = {}
    paths: list[Path] = []
    for key, line in zip(keys, np.repeat(pairs.line, 2).tolist()):
        if key in slot:
            continue
        path = lfw_image_path(root, *key)
        if not path.is_file():
            raise DataError(f"{path}: image missing, needed by {pairs.path}:{line}; expected LFW layout "
                            f"root/Name/Name_NNNN.jpg under {root}")
        slot[key] = len(paths)
        paths.append(path)
    unique = load_images(paths, image_size, channels)
    index = np.fromiter((slot[k] for k in keys), np.int64, count=len(keys)).reshape(-1, 2)
    return unique[index[:, 0]], unique[index[:, 1]], pairs
