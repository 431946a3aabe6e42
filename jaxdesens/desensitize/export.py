"""Export a desensitized copy of an image set: the one thing that leaves the data owner's site.

    run_export(ExportJob(data=FOLDER, out=EXPORT, key=KEYFILE, mask=MASK))

Input: an identity folder (one sub-folder per identity) or a flat folder of images. Every image
is decoded, resized and centre-cropped by `load_image` exactly as the training loader does, then
desensitized (`x * m` for a mask; blur or mosaic for the paper's baselines) and written as a
lossless PNG built from the raw pixel array. Output folder:

  manifest.json          format, tool version, method and settings, the digest salt, counts, and
                         per file: path, id, pseudonym, keyed digest of the PNG (HMAC-SHA256
                         under the salt; the mask's too). No original names.
  mask.png               the mask (255 = visible, 0 = hidden); the FSM receiver needs it
  privacy_report.{json,md}  mask ratio, dSSIM/PSNR vs the originals, classical inpainting attacks,
                         re-identification by dlib (numbers only; details in the owner log)
  <pseudonym>/<id>.png   identity input (so the export is again an identity folder)
  images/<id>.png        flat input

What never leaves: metadata (each PNG keeps only its IHDR, IDAT and IEND chunks, so no EXIF/GPS,
ICC profile, XMP, thumbnail or text chunk survives, whatever PIL would add), original file and
identity names (ids and pseudonyms are HMAC-SHA256 values under the owner's key file, which is
never written to the export or logged), the input order (files are written in id order, so even
modification times and inode numbers follow the random-looking ids), the input path, and the
paths of unreadable inputs (they go to an owner-side log next to the key file; the export only
counts them).

Robustness: each file goes to a temporary name and is renamed (`paths.write_atomic`); a journal
of finished files lets `resume=True` skip files already written (`resume.py`); the manifest is
written last, atomically. Keys and keyed names are in `pseudonyms.py`, the privacy report in
`report.py`, the PNG writer in `files.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxdesens.data.errors import DataError
from jaxdesens.data.export_reader import (
    DIGEST_ALGORITHM,
    FORMAT,
    MANIFEST,
    MASK_FILE,
    REPORT_JSON,
    REPORT_MD,
    keyed_digest,
    keyed_digest_file,
)
from jaxdesens.data.images import load_image
from jaxdesens.desensitize.files import encode_png
from jaxdesens.desensitize.operators import METHODS, desensitize, paper_sizes
from jaxdesens.desensitize.pseudonyms import PlannedFile, digest_salt, load_or_create_key, plan_export
from jaxdesens.desensitize.report import (
    ATTACKS,
    attack_report,
    audit_sample,
    batch_quality,
    reidentification_report,
    render_report_md,
    stats,
)
from jaxdesens.desensitize.resume import JOURNAL, STATE, input_fingerprint, open_output, refuse_unexpected
from jaxdesens.masks import io as mask_io
from jaxdesens.masks.ops import apply_mask, mask_ratio
from jaxdesens.paths import is_inside, write_atomic, write_json


@dataclasses.dataclass(frozen=True)
class ExportJob:
    data: str = ""
    out: str = ""
    key: str = ""
    mask: str | None = None
    method: str = "mask"
    size: int | None = None
    image_size: int | None = None
    channels: int = 3
    resume: bool = False
    strict: bool = False
    attack_images: int = 64
    attacks: str = ",".join(ATTACKS)
    owner_log: str | None = None
    batch: int = 64
    workers: int = 0
    check_alignment: bool = True
    audit: bool = True
    audit_probes: int = 64

    def __post_init__(self):
        missing = [f"--{name}" for name in ("data", "out", "key") if not getattr(self, name)]
        if missing:
            raise ValueError(f"{', '.join(missing)} required (input folder, new output folder, owner's key file)")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.method == "mask" and not self.mask:
            raise DataError("--method=mask needs --mask=FILE (mask.png or mask.npy from launch/search.py); "
                            "for a comparison use --method=blur|mosaic with --image_size and --size")
        if self.method != "mask" and self.mask:
            raise ValueError(f"--mask is only used with --method=mask, not --method={self.method}")
        if self.method != "mask" and not self.image_size:
            raise ValueError(f"--method={self.method} needs --image_size (there is no mask to take it from)")
        if self.channels not in (1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {self.channels}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size must be >= 1, got {self.image_size}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"--size must be >= 1, got {self.size}")
        if self.attack_images < 0 or self.batch < 1 or self.workers < 0 or self.audit_probes < 1:
            raise ValueError("--attack_images >= 0, --batch >= 1, --workers >= 0 and --audit_probes >= 1 are required")
        bad = [a for a in self.attack_methods if a not in ATTACKS]
        if bad:
            raise ValueError(f"unknown --attacks {bad}; choose from {','.join(ATTACKS)} (or none)")

    @property
    def attack_methods(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.attacks.split(",") if a.strip() and a.strip() != "none")


# ---------------------------------------------------------------------------------- settings
def _creatable(flag: str, path: Path) -> None:
    """Refuses, naming the flag, a path that cannot be created: under a file, or not writable."""
    if path.exists():
        return
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise DataError(f"{flag}={path}: cannot create it, {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{flag}={path}: cannot create it, {existing} is not writable")


def check_paths(job: ExportJob, owner_log: Path) -> None:
    data, out = Path(job.data).resolve(), Path(job.out).resolve()
    if is_inside(out, data):
        raise DataError(f"{job.out}: the output folder is inside the input folder {job.data}; "
                        "choose an output folder outside it")
    if is_inside(data, out):
        raise DataError(f"{job.data}: the input folder is inside the output folder {job.out}; "
                        "choose an output folder outside it")
    for what, path in (("--key", Path(job.key)), ("the owner log", owner_log)):
        if is_inside(path.resolve(), out):
            raise DataError(f"{path}: {what} would be inside the export {job.out}, which is handed over; "
                            "keep it outside")
    if is_inside(owner_log, data):
        raise DataError(f"--owner_log={owner_log} is inside --data={job.data}; outputs never go into the input")
    if out.exists() and not out.is_dir():
        raise DataError(f"{job.out}: exists and is not a folder")
    for flag, path in (("--key", Path(job.key).resolve()), ("--out", out), ("--owner_log", owner_log.resolve())):
        _creatable(flag, path)
    check_owner_log(owner_log, out)


def default_owner_log(job: ExportJob) -> Path:
    """Next to the key, named after the export folder and a hash of its full path: two exports
    named alike (a/export, b/export) with one key folder keep separate logs."""
    if job.owner_log:
        return Path(job.owner_log)
    out = Path(job.out).resolve()
    tag = hashlib.sha256(str(out).encode()).hexdigest()[:8]
    return Path(job.key).resolve().parent / f"{out.name}.{tag}.owner-log.json"


def check_owner_log(owner_log: Path, out: Path) -> None:
    """An existing owner log may only be replaced by a run of the same export."""
    if not owner_log.exists():
        return
    try:
        previous = json.loads(owner_log.read_text()).get("export")
    except (OSError, ValueError, AttributeError) as err:
        raise DataError(f"{owner_log}: exists and is not an owner log of this tool; choose another --owner_log") \
            from err
    if previous != str(out):
        raise DataError(f"{owner_log}: this owner log belongs to another export ({previous}); choose another "
                        "--owner_log or another --out")


def prepare_mask(job: ExportJob, log: Callable[[str], None]) -> tuple[np.ndarray | None, int, int | None]:
    """(mask or None, image size, blur/mosaic size) after checking the mask against the settings."""
    if job.method != "mask":
        size = job.size or paper_sizes(job.image_size)[job.method][1]
        return None, job.image_size, size
    mask = mask_io.load_mask(job.mask)
    _refuse_grey_png(job.mask)
    height, width = mask.shape
    if height != width:
        raise DataError(f"{job.mask}: mask is {height}x{width}; images are exported square (shorter side resized, "
                        "centre crop), so the mask must be square")
    image_size = job.image_size or height
    if image_size != height:
        before = mask_ratio(mask)
        mask = mask_io.load_mask(job.mask, image_size)
        log(f"mask {height}x{width} resized to {image_size}x{image_size} (nearest neighbour): ratio {before:.3f} -> "
            f"{mask_ratio(mask):.3f}")
    if mask.min() == 1.0:
        raise DataError(f"{job.mask}: the mask hides no pixel; the export would be the original images")
    if mask.max() == 0.0:
        raise DataError(f"{job.mask}: the mask hides every pixel at {image_size}x{image_size}; the export would be "
                        "black images (and the receiver's reader refuses such an export)")
    return mask, image_size, None


def _refuse_grey_png(path: str) -> None:
    """A PNG mask must be 0/255 only: thresholding grey (anti-aliased, resized) edges at 128 would
    silently decide which pixels leave, and a non-binary .npy is refused too."""
    if Path(path).suffix.lower() != ".png":
        return
    with Image.open(path) as image:
        values = np.asarray(image.convert("L"))
    grey = int(np.count_nonzero((values != 0) & (values != 255)))
    if grey:
        raise DataError(f"{path}: {grey} pixel(s) are neither 0 nor 255 (a grey or anti-aliased PNG); a mask must be "
                        "binary (255 = visible, 0 = hidden): use the mask launch/search.py wrote, or threshold it")


def _settings(job: ExportJob, mask: np.ndarray | None, image_size: int, size: int | None,
              layout: str) -> dict[str, Any]:
    """What a resumed export must share with the interrupted one (the key is checked by the ids)."""
    from jaxdesens import __version__

    return {"format": FORMAT, "version": __version__, "method": job.method, "layout": layout,
            "image_size": image_size, "channels": job.channels, "size": size,
            "mask_fingerprint": None if mask is None else mask_io.fingerprint(mask),
            "mask_ratio": None if mask is None else round(float(mask_ratio(mask)), 6)}



# ------------------------------------------------------------------------------- processing
def desensitize_batch(images: np.ndarray, method: str, mask: np.ndarray | None, size: int | None,
                      batch: int) -> np.ndarray:
    """uint8 NHWC -> uint8 NHWC. The mask is applied in integer arithmetic (`x * m`, exact:
    hidden pixels are 0, visible ones untouched); blur/mosaic run the JAX operators on a batch
    padded to `batch` images (one compiled shape) and round back to uint8."""
    if method == "mask":
        return apply_mask(images, mask)
    padded = np.concatenate([images, np.repeat(images[:1], batch - len(images), 0)]) if len(images) < batch else images
    out = np.asarray(desensitize(padded.astype(np.float32) / 255.0, method, size=size))
    return np.round(np.clip(out[:len(images)], 0.0, 1.0) * 255.0).astype(np.uint8)



def check_alignment(job: ExportJob, plan: list[PlannedFile], log: Callable[[str], None]) -> dict[str, Any] | None:
    """One mask fits a set only if its faces are aligned: a sample's landmark spread is measured
    and a warning logged when they are not (the export goes on; the owner log keeps the numbers)."""
    if job.method != "mask" or not job.check_alignment:
        return None
    from jaxdesens.align.check import alignment_warning, landmark_spread

    report = landmark_spread([p.source for p in plan])
    warning = alignment_warning(report, job.data)
    if warning:
        log(f"warning: {warning}")
    return report


def export_attacks(plan: list[PlannedFile], job: ExportJob, mask: np.ndarray, image_size: int,
                   progress: bool) -> dict[str, Any]:
    """Classical inpainting on an evenly spaced subset (in id order, so spread over identities)."""
    count = min(job.attack_images, len(plan))
    chosen = [plan[i] for i in np.arange(count) * len(plan) // count] if count and job.attack_methods else []
    originals = np.stack([load_image(p.source, image_size, job.channels) for p in chosen]) if chosen else \
        np.zeros((0, image_size, image_size, job.channels), np.uint8)
    return attack_report(originals, mask, job.attack_methods, progress)


def export_reidentification(exported: list[dict[str, Any]], planned: dict[str, PlannedFile], job: ExportJob,
                            mask: np.ndarray | None, image_size: int, size: int | None, progress: bool,
                            log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """dlib on a sample of the exported people: (the report's summary, the owner log's details)."""
    if not job.audit:
        return {"run": False, "note": "not run (--audit=false)"}, None
    files = [(e["pseudonym"], planned[e["id"]].source) for e in sorted(exported, key=lambda e: e["id"])]
    sample = audit_sample([f for f in files if f[0]], job.audit_probes)
    if not sample:
        return {"run": False, "note": "not applicable: no person has two exported photos (or the input is flat, "
                                      "without identities)"}, None
    people = sorted({person for person, _ in sample})
    labels = np.array([people.index(person) for person, _ in sample])
    originals = np.stack([load_image(source, image_size, job.channels) for _, source in sample])
    return reidentification_report(originals, labels, job.method, mask, size, job.attack_methods, job.audit_probes,
                                   progress, log)


def run_export(job: ExportJob, progress: bool = True, log: Callable[[str], None] = print,
               on_file: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Runs the whole export; returns a summary (counts, files/s, the privacy report, owner log).

    `on_file(done)` is called after each file is journalled (tests use it to interrupt a run).
    """
    from tqdm.auto import tqdm

    from jaxdesens import __version__

    start_time = time.perf_counter()
    owner_log = default_owner_log(job)
    check_paths(job, owner_log)
    mask, image_size, size = prepare_mask(job, log)
    key = load_or_create_key(job.key, log)
    planning = plan_export(job.data, key)
    layout, plan = planning.layout, planning.files
    alignment = check_alignment(job, plan, log)
    if planning.symlinks:
        log(f"{len(planning.symlinks)} symlink(s) in --data point outside it and were followed; listed in the owner "
            f"log {owner_log}")
    mask_png = encode_png((mask * 255).astype(np.uint8)) if mask is not None else None
    settings = _settings(job, mask, image_size, size, layout)
    salt = digest_salt(key)
    done, complete = open_output(Path(job.out), job.resume, settings, plan, log,
                                 digest=lambda path: keyed_digest_file(salt, path))
    out = Path(job.out)
    if complete:
        log(f"{job.out}: the export is already complete and intact; nothing to do")
        return {"files": len(done), "complete": True, "out": str(out), "files_per_s": 0.0, "skipped": None,
                "report": json.loads((out / REPORT_JSON).read_text()) if (out / REPORT_JSON).exists() else None,
                "owner_log": None}
    write_json(out / STATE, settings)
    if mask_png is not None:
        write_atomic(out / MASK_FILE, mask_png)

    planned = {p.id: p for p in plan}
    todo = [p for p in plan if p.id not in done]
    bad: list[dict[str, str]] = []
    resumed = len(done)
    workers = job.workers or min(8, 2 * (os.cpu_count() or 1))
    for folder in sorted({p.rel.split("/")[0] for p in todo}):
        (out / folder).mkdir(exist_ok=True)

    def load(item: PlannedFile) -> np.ndarray | DataError:
        try:
            return load_image(item.source, image_size, job.channels)
        except DataError as err:
            return err

    def write(args: tuple[PlannedFile, np.ndarray]) -> str:
        item, pixels = args
        data = encode_png(pixels)
        write_atomic(out / item.rel, data)
        return keyed_digest(salt, data)

    bar = tqdm(total=len(plan), initial=resumed, disable=not progress, unit="file", desc="exporting",
               dynamic_ncols=True)
    loop_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool, open(out / JOURNAL, "a") as journal:
        for begin in range(0, len(todo), job.batch):
            chunk = todo[begin:begin + job.batch]
            good, originals = [], []
            for item, result in zip(chunk, pool.map(load, chunk)):
                if isinstance(result, DataError):
                    if job.strict:
                        raise DataError(f"{item.source}: unreadable input, --strict stops the export ({result}); "
                                        "fix or remove the file, then rerun with --resume")
                    bad.append({"path": str(item.source), "error": str(result)})
                else:
                    good.append(item)
                    originals.append(result)
            if good:
                originals = np.stack(originals)
                outputs = desensitize_batch(originals, job.method, mask, size, job.batch)
                if mask is not None and outputs[:, mask == 0].any():
                    raise AssertionError("a hidden pixel is not 0")  # cannot happen: x * 0 = 0
                psnrs, dssims = batch_quality(originals, outputs, job.batch)
                digests = list(pool.map(write, zip(good, outputs)))
                for i, (item, digest) in enumerate(zip(good, digests)):
                    entry = {"id": item.id, "pseudonym": item.pseudonym, "path": item.rel, "digest": digest,
                             "psnr": float(psnrs[i]), "dssim": None if np.isnan(dssims[i]) else float(dssims[i])}
                    journal.write(json.dumps(entry) + "\n")
                    journal.flush()
                    done[item.id] = entry
                    if on_file is not None:
                        on_file(len(done))
            bar.update(len(chunk))
            bar.set_postfix(skipped=len(bad), refresh=False)
        os.fsync(journal.fileno())
    bar.close()
    loop_seconds = time.perf_counter() - loop_start
    rate = (len(done) - resumed) / max(loop_seconds, 1e-9)
    if not done:
        raise DataError(f"{job.data}: none of the {len(plan)} images could be read; see the owner log")

    exported = sorted(done.values(), key=lambda e: e["path"])
    identities = len({e["pseudonym"] for e in exported if e["pseudonym"]})
    files = [{k: e[k] for k in ("path", "id", "pseudonym", "digest")} for e in exported]
    fingerprint = hashlib.sha256("".join(f"{f['path']}\0{f['digest']}\n" for f in files).encode()).hexdigest()[:16]
    report = {
        "format": FORMAT, "version": __version__, "method": job.method, "mask_ratio": settings["mask_ratio"],
        "method_size": size, "image_size": image_size, "channels": job.channels, "images": len(exported),
        "identities": identities, "skipped_unreadable": len(bad),
        "desensitized_vs_original": {"psnr": stats([e["psnr"] for e in exported]),
                                     "dssim": stats([e["dssim"] for e in exported])},
        "attacks": (export_attacks([planned[e["id"]] for e in sorted(exported, key=lambda e: e["id"])], job, mask,
                                   image_size, progress) if mask is not None else
                    {"images": 0, "methods": {},
                     "note": f"not applicable to --method={job.method} (no hidden pixels)"}),
    }
    report["reidentification"], owner_audit = export_reidentification(exported, planned, job, mask, image_size, size,
                                                                      progress, log)
    written = {f["path"] for f in files} | ({MASK_FILE} if mask is not None else set())
    refuse_unexpected(out, written | {STATE, JOURNAL}, "that this export does not write")  # before it is final
    write_json(out / REPORT_JSON, report)
    write_atomic(out / REPORT_MD, render_report_md(report).encode())
    manifest = {
        "format": FORMAT, "tool": "jaxdesens", "version": __version__, "method": job.method, "layout": layout,
        "settings": {"image_size": image_size, "channels": job.channels, "size": size,
                     "mask_ratio": settings["mask_ratio"]},
        "digest": {"algorithm": DIGEST_ALGORITHM, "salt": salt},
        "mask": None if mask is None else {"file": MASK_FILE, "digest": keyed_digest(salt, mask_png),
                                           "shape": list(mask.shape), "fingerprint": settings["mask_fingerprint"]},
        "counts": {"files": len(files), "identities": identities, "skipped_unreadable": len(bad)},
        "fingerprint": fingerprint, "input_fingerprint": input_fingerprint(plan), "files": files,
    }
    write_json(out / MANIFEST, manifest)
    (out / JOURNAL).unlink(missing_ok=True)
    (out / STATE).unlink(missing_ok=True)
    refuse_unexpected(out, written | {MANIFEST, REPORT_JSON, REPORT_MD}, "that appeared during the run: do not hand "
                      "it over")

    seconds = time.perf_counter() - start_time
    owner = {"export": str(out.resolve()), "input": str(Path(job.data).resolve()), "skipped_unreadable": bad,
             "ignored_non_images": planning.ignored, "symlinks_out_of_data": planning.symlinks,
             "alignment_check": alignment, "reidentification_audit": owner_audit,
             "exported": len(files), "resumed_from": resumed,
             "files_per_s": round(rate, 1), "seconds": round(seconds, 2)}
    write_json(owner_log, owner, mode=0o600)  # names original files: as private as the key
    log(f"exported {len(files)} images of {identities} identities to {job.out} ({rate:.0f} files/s); "
        f"{len(bad)} unreadable input(s) skipped" + (f", listed in the owner log {owner_log} (not in the export)"
                                                    if bad else f"; owner log {owner_log}"))
    return {"files": len(files), "identities": identities, "skipped": len(bad), "files_per_s": rate,
            "seconds": seconds, "report": report, "out": str(out), "owner_log": str(owner_log), "complete": True}
