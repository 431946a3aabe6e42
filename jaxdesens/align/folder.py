"""Aligning a whole photo collection: identity folders (or a flat folder) in, the same layout out.

    run_align(AlignJob(data=RAW, out=ALIGNED, size=112))

Each photo is decoded upright (EXIF orientation applied, as every reader of the project does),
its faces are found, the largest face's landmarks are mapped onto the template by a similarity
transform and the photo is warped into a `size` x `size` PNG at `OUT/<identity>/<stem>.png`
(greyscale stays greyscale). Photos with no face are not written; photos with several faces are
aligned on the largest. Both are listed, with unreadable files, in the log `OUT.align-log.json`
next to the output folder (never inside it: the output is handed on as a data set). The log is
also the journal: a killed run, rerun with the same command, skips what it already did.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxdesens.align import faces as face_models
from jaxdesens.align.geometry import dlib5_points, similarity_transform, template, warp
from jaxdesens.data.errors import DataError
from jaxdesens.data.images import is_image_file, open_image
from jaxdesens.paths import is_inside, write_atomic, write_json

LOG_FORMAT = "jaxdesens-align/1"
FLUSH_EVERY = 50  # files between journal writes


@dataclasses.dataclass(frozen=True)
class AlignJob:
    data: str = ""
    out: str = ""
    size: int = 112
    detector: str = "hog"

    def __post_init__(self):
        if not self.data or not self.out:
            raise ValueError("--data (photos: identity folders or a flat folder) and --out (new folder) are required")
        if self.size < 16:
            raise ValueError(f"--size must be >= 16 px, got {self.size}")
        if self.detector not in face_models.DETECTORS:
            raise ValueError(f"--detector must be one of {', '.join(face_models.DETECTORS)}, got {self.detector!r}")

    @property
    def log_path(self) -> Path:
        out = Path(self.out).resolve()
        return out.parent / f"{out.name}.align-log.json"


@dataclasses.dataclass(frozen=True)
class Aligned:
    """One aligned face: the output pixels, the transform (output = matrix @ photo) and the
    distance in output pixels of its landmarks from the template after the fit."""

    pixels: np.ndarray
    matrix: np.ndarray
    residual: float


def align_face(image: np.ndarray, face: face_models.Face, size: int) -> Aligned:
    """Warps `image` so that `face`'s eye centres and nose base land on the template."""
    points = dlib5_points(face.landmarks)
    target = template(size)
    matrix = similarity_transform(points, target)
    moved = points @ matrix[:, :2].T + matrix[:, 2]
    return Aligned(warp(image, matrix, size), matrix, float(np.linalg.norm(moved - target, axis=1).mean()))


def list_photos(root: Path) -> list[tuple[Path, str]]:
    """(photo, output path relative to --out) for identity folders or a flat folder of photos."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; --data must hold identity folders of photos, or photos")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and is_image_file(p)]
    if folders and loose:
        raise DataError(f"{root}: holds both identity sub-folders ({len(folders)}) and {len(loose)} loose photos; "
                        "put the loose photos in identity folders or align them separately")
    photos = [(f, f"{folder.name}/{f.stem}.png") for folder in folders for f in sorted(folder.iterdir())
              if f.is_file() and is_image_file(f)] + [(f, f"{f.stem}.png") for f in loose]
    if not photos:
        raise DataError(f"{root}: no photos found (expected identity sub-folders of images, or images)")
    seen: dict[str, Path] = {}
    for photo, rel in photos:
        other = seen.setdefault(rel, photo)
        if other != photo:
            raise DataError(f"{photo}: would be written as {rel} like {other.name}; rename one of them")
    return photos


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _settings(job: AlignJob) -> dict[str, Any]:
    return {"size": job.size, "detector": job.detector, "template": template(job.size).round(4).tolist()}


def _previous(job: AlignJob, out: Path, data: Path) -> dict[str, dict[str, Any]]:
    """Per-photo records of an earlier run into `out` (a rerun resumes), or {} for a new output."""
    if not out.exists() or not any(out.iterdir()):
        return {}
    if not job.log_path.is_file():
        raise DataError(f"{out}: not empty and no alignment log {job.log_path} next to it; choose a new --out")
    try:
        log = json.loads(job.log_path.read_text())
    except ValueError as err:
        raise DataError(f"{job.log_path}: unreadable alignment log ({err}); choose a new --out") from err
    if log.get("format") != LOG_FORMAT or log.get("input") != str(data) or log.get("settings") != _settings(job):
        raise DataError(f"{out}: holds an alignment of another input or with other settings (see {job.log_path}); "
                        "choose a new --out or the original settings")
    return log.get("photos", {})


def run_align(job: AlignJob, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Aligns every photo of `job.data` into `job.out`; returns the counts and the log's path."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    data, out = Path(job.data).resolve(), Path(job.out).resolve()
    for path, what in ((out, "--out"), (job.log_path, "the alignment log")):
        if is_inside(path, data):
            raise DataError(f"{path}: {what} would be inside --data={job.data}; outputs never go into the input")
    if is_inside(data, out):
        raise DataError(f"--data={job.data} is inside --out={job.out}; choose an output folder outside it")
    photos = list_photos(data)
    finder = face_models.face_finder(job.detector)
    records = _previous(job, out, data)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--out={job.out}: cannot create the output folder ({err.strerror or err})") from err

    def flush(complete: bool) -> dict[str, Any]:
        lists = {status: sorted(k for k, r in records.items() if r["status"] == status)
                 for status in ("no_face", "unreadable")}
        several = sorted(k for k, r in records.items() if r.get("faces", 0) > 1)
        residuals = [r["residual_px"] for r in records.values() if "residual_px" in r]
        summary = {"format": LOG_FORMAT, "input": str(data), "output": str(out), "settings": _settings(job),
                   "complete": complete, "photos_in_input": len(photos),
                   "aligned": sum(r["status"] == "aligned" for r in records.values()),
                   "no_face": lists["no_face"], "several_faces": several, "unreadable": lists["unreadable"],
                   "mean_residual_px": round(float(np.mean(residuals)), 3) if residuals else None,
                   "seconds": round(time.perf_counter() - start, 1), "photos": records}
        write_json(job.log_path, summary)
        return summary

    todo = [(photo, rel) for photo, rel in photos if not _done(records.get(str(photo)), out / rel)]
    if len(todo) < len(photos):
        log(f"resuming: {len(photos) - len(todo)} of {len(photos)} photos done earlier")
    for folder in sorted({(out / rel).parent for _, rel in todo}):
        folder.mkdir(parents=True, exist_ok=True)
    for n, (photo, rel) in enumerate(tqdm(todo, disable=not progress, unit="photo", desc="aligning",
                                          dynamic_ncols=True)):
        records[str(photo)] = _align_one(photo, out / rel, rel, finder, job.size)
        if (n + 1) % FLUSH_EVERY == 0:
            flush(complete=False)
    summary = flush(complete=True)
    log(f"aligned {summary['aligned']} of {len(photos)} photos into {job.out} ({job.size}x{job.size}, mean landmark "
        f"residual {summary['mean_residual_px']} px); {len(summary['no_face'])} without a face, "
        f"{len(summary['several_faces'])} with several (largest used), {len(summary['unreadable'])} unreadable: "
        f"listed in {job.log_path}")
    return {k: v for k, v in summary.items() if k != "photos"} | {"log": str(job.log_path)}


def _done(record: dict[str, Any] | None, target: Path) -> bool:
    return record is not None and (record["status"] != "aligned" or target.is_file())


def _align_one(photo: Path, target: Path, rel: str, finder: face_models.FaceFinder, size: int) -> dict[str, Any]:
    try:
        image = np.asarray(open_image(photo, grey=False))
    except DataError as err:
        return {"status": "unreadable", "error": str(err)}
    found = finder.find(image)
    if not found:
        return {"status": "no_face", "faces": 0}
    aligned = align_face(image, found[0], size)
    write_atomic(target, _png(aligned.pixels))
    return {"status": "aligned", "faces": len(found), "output": rel, "residual_px": round(aligned.residual, 3)}
