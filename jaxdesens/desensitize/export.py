"""Export a desensitized copy of an image set: the one thing that leaves the data owner's site.

    run_export(ExportJob(data=FOLDER, out=EXPORT, key=KEYFILE, mask=MASK))

Input: an identity folder (one sub-folder per identity) or a flat folder of images. Every image
is decoded, resized and centre-cropped by `load_image` exactly as the training loader does, then
desensitized (`x * m` for a mask; blur or mosaic for the paper's baselines) and written as a
lossless PNG built from the raw pixel array. Output folder:

  manifest.json          format, tool version, method and settings, mask sha256, counts, and per
                         file: path, id, pseudonym, sha256 of the PNG. No original names.
  mask.png               the mask (255 = visible, 0 = hidden); the FSM receiver needs it
  privacy_report.{json,md}  mask ratio, dSSIM/PSNR vs the originals, classical inpainting attacks
  <pseudonym>/<id>.png   identity input (so the export is again an identity folder)
  images/<id>.png        flat input

What never leaves: metadata (each PNG keeps only its IHDR, IDAT and IEND chunks, so no EXIF/GPS,
ICC profile, XMP, thumbnail or text chunk survives, whatever PIL would add), original file and
identity names (ids and pseudonyms are HMAC-SHA256 values under the owner's key file, which is
never written to the export or logged), the input order (files are written in id order, so even
modification times and inode numbers follow the random-looking ids), the input path, and the
paths of unreadable inputs (they go to an owner-side log next to the key file; the export only
counts them).

Robustness: each file goes to a temporary name and is renamed; a journal of finished files
(`.jaxdesens-export-journal.jsonl`, ids and hashes only) lets `resume=True` skip files whose PNG
exists with the journalled sha256; the manifest is written last, atomically, then the journal is
removed. A resumed export's manifest is identical to an uninterrupted one's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import json
import os
import secrets
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxdesens.data.errors import DataError
from jaxdesens.data.export_reader import (
    FLAT_DIR,
    FORMAT,
    LAYOUT_FLAT,
    LAYOUT_IDENTITIES,
    MANIFEST,
    MASK_FILE,
    REPORT_JSON,
    REPORT_MD,
    read_manifest,
    sha256_file,
)
from jaxdesens.data.images import is_image_file, load_image
from jaxdesens.desensitize.operators import METHODS, desensitize, paper_sizes
from jaxdesens.masks import io as mask_io
from jaxdesens.masks.ops import apply_mask, mask_ratio
from jaxdesens.paths import is_inside

STATE = ".jaxdesens-export-state.json"
JOURNAL = ".jaxdesens-export-journal.jsonl"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALLOWED_PNG_CHUNKS = (b"IHDR", b"IDAT", b"IEND")
ID_HEX, PSEUDONYM_HEX = 24, 16  # 96- and 64-bit HMAC prefixes: collisions are checked anyway
PSNR_CAP = 100.0  # dB; identical images (PSNR = inf) count as 100 dB so means stay finite
ATTACKS = ("biharmonic", "navier-stokes", "telea")


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
        if self.attack_images < 0 or self.batch < 1 or self.workers < 0:
            raise ValueError("--attack_images >= 0, --batch >= 1 and --workers >= 0 are required")
        bad = [a for a in self.attack_methods if a not in ATTACKS]
        if bad:
            raise ValueError(f"unknown --attacks {bad}; choose from {','.join(ATTACKS)} (or none)")

    @property
    def attack_methods(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.attacks.split(",") if a.strip() and a.strip() != "none")


@dataclasses.dataclass(frozen=True)
class PlannedFile:
    source: Path
    id: str
    pseudonym: str | None  # None for flat input

    @property
    def rel(self) -> str:
        return f"{self.pseudonym or FLAT_DIR}/{self.id}.png"


# ---------------------------------------------------------------------------------------- PNG
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


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Writes `.<name>.<random>.tmp` beside `path`, then renames it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, values: Any, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, (json.dumps(values, indent=2, sort_keys=True) + "\n").encode(), mode)


# ------------------------------------------------------------------------------ key and names
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


# ---------------------------------------------------------------------------------- settings
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
    if out.exists() and not out.is_dir():
        raise DataError(f"{job.out}: exists and is not a folder")


def default_owner_log(job: ExportJob) -> Path:
    if job.owner_log:
        return Path(job.owner_log)
    return Path(job.key).resolve().parent / f"{Path(job.out).resolve().name}.owner-log.json"


def prepare_mask(job: ExportJob, log: Callable[[str], None]) -> tuple[np.ndarray | None, int, int | None]:
    """(mask or None, image size, blur/mosaic size) after checking the mask against the settings."""
    if job.method != "mask":
        size = job.size or paper_sizes(job.image_size)[job.method][1]
        return None, job.image_size, size
    mask = mask_io.load_mask(job.mask)
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
    return mask, image_size, None


def _settings(job: ExportJob, mask: np.ndarray | None, image_size: int, size: int | None, layout: str,
              mask_png: bytes | None) -> dict[str, Any]:
    from jaxdesens import __version__

    return {"format": FORMAT, "version": __version__, "method": job.method, "layout": layout,
            "image_size": image_size, "channels": job.channels, "size": size,
            "mask_sha256": hashlib.sha256(mask_png).hexdigest() if mask_png is not None else None,
            "mask_ratio": None if mask is None else round(float(mask_ratio(mask)), 6)}


def _manifest_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    s, m = manifest.get("settings", {}), manifest.get("mask") or {}
    return {"format": manifest.get("format"), "version": manifest.get("version"), "method": manifest.get("method"),
            "layout": manifest.get("layout"), "image_size": s.get("image_size"), "channels": s.get("channels"),
            "size": s.get("size"), "mask_sha256": m.get("sha256"), "mask_ratio": s.get("mask_ratio")}


def _differences(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(stored) | set(now))
            if stored.get(k) != now.get(k)]


# ----------------------------------------------------------------------------------- resume
def _output_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()]


def _read_journal(out: Path) -> dict[str, dict[str, Any]]:
    entries = {}
    path = out / JOURNAL
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                entries[entry["id"]] = entry
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by the kill
    return entries


def open_output(job: ExportJob, settings: dict[str, Any], plan: list[PlannedFile],
                log: Callable[[str], None]) -> tuple[dict[str, dict[str, Any]], bool]:
    """Prepares the output folder; returns (journal of finished files, export already complete)."""
    out = Path(job.out)
    entries = list(out.iterdir()) if out.exists() else []
    if entries and not job.resume:
        raise DataError(f"{job.out}: not empty; choose a new output folder, or pass --resume to continue an "
                        "interrupted export into it")
    planned = {p.id: p for p in plan}
    if entries:
        if (out / STATE).exists():
            try:
                stored = json.loads((out / STATE).read_text())
            except ValueError as err:
                raise DataError(f"{out / STATE}: unreadable export state ({err}); start a new export") from err
            complete = False
        elif (out / MANIFEST).exists():
            stored = _manifest_settings(read_manifest(out))
            complete = True
        else:
            raise DataError(f"{job.out}: holds files but no export in progress ({STATE}) or finished "
                            f"({MANIFEST}); choose a new output folder")
        diffs = _differences(stored, settings)
        if diffs:
            raise DataError(f"{job.out}: holds an export with other settings; use the original ones or a new "
                            "folder. Differences (stored -> now):\n  " + "\n  ".join(diffs))
        for leftover in _output_files(out):  # temporary files of a killed run
            if leftover.name.startswith(".") and leftover.parent == out and leftover.name in (STATE, JOURNAL):
                continue
            if leftover.name.startswith("."):
                leftover.unlink()
        journal = _read_journal(out)
        if complete:
            journal = {e["id"]: e for e in read_manifest(out).get("files", [])}
        on_disk = {p.stem for p in _output_files(out) if p.suffix == ".png" and p.parent != out}
        foreign = (set(journal) | on_disk) - set(planned)
        if foreign:
            raise DataError(f"{job.out}: holds {len(foreign)} file(s) this input and key do not produce (another "
                            "--key, or the input changed); start a new export")
        wrong_place = [i for i, e in journal.items() if e.get("path") != planned[i].rel]
        if wrong_place:
            raise DataError(f"{job.out}: {len(wrong_place)} file(s) sit under other pseudonyms (another --key?)")
        done = {}
        for ident, entry in journal.items():
            file = out / planned[ident].rel
            if file.is_file() and sha256_file(file) == entry.get("sha256"):
                done[ident] = entry
        if complete:
            if len(done) != len(journal):
                raise DataError(f"{job.out}: a finished export whose files are missing or altered "
                                f"({len(journal) - len(done)}); export again into a new folder")
            (out / JOURNAL).unlink(missing_ok=True)  # left when killed right after the manifest
            return done, True
        log(f"resuming: {len(done)} of {len(plan)} files already exported")
        return done, False
    out.mkdir(parents=True, exist_ok=True)
    return {}, False


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


def batch_quality(originals: np.ndarray, outputs: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (capped at `PSNR_CAP`) and dSSIM of the written outputs vs the originals."""
    from jaxdesens.metrics.quality import SSIM_WINDOW, dssim, psnr

    n = len(originals)
    pad = lambda x: np.concatenate([x, np.repeat(x[:1], batch - n, 0)]) if n < batch else x  # noqa: E731
    a, b = pad(originals).astype(np.float32) / 255.0, pad(outputs).astype(np.float32) / 255.0
    p = np.minimum(np.asarray(psnr(a, b))[:n], PSNR_CAP)
    d = np.asarray(dssim(a, b))[:n] if min(a.shape[1:3]) >= SSIM_WINDOW else np.full(n, np.nan)
    return p.astype(np.float64), d.astype(np.float64)


def _stats(values: list[float]) -> dict[str, float | None]:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if not len(values):
        return {"mean": None, "std": None}
    return {"mean": round(float(values.mean()), 6), "std": round(float(values.std()), 6)}


def _finite(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None


def attack_report(plan: list[PlannedFile], job: ExportJob, mask: np.ndarray, image_size: int,
                  progress: bool) -> dict[str, Any]:
    """Classical inpainting on an evenly spaced subset (in id order, so spread over identities)."""
    from jaxdesens.metrics.attacks import restoration_report

    count = min(job.attack_images, len(plan))
    if count == 0 or not job.attack_methods:
        return {"images": 0, "methods": {}, "note": "no attack run (--attack_images=0 or --attacks=none)"}
    chosen = [plan[i] for i in np.arange(count) * len(plan) // count]
    originals = np.stack([load_image(p.source, image_size, job.channels) for p in chosen])
    masked = desensitize_batch(originals, "mask", mask, None, len(chosen))
    report = restoration_report(originals.astype(np.float32) / 255.0, masked.astype(np.float32) / 255.0, mask,
                                job.attack_methods, progress=progress)
    pick = lambda s: {k: _finite(s[k]) for k in ("psnr_mean", "psnr_std", "ssim_mean", "ssim_std")}  # noqa: E731
    return {"images": count, "masked_baseline": pick(report["baseline"]),
            "methods": {name: pick(stats) for name, stats in report["methods"].items()}}


def render_report_md(report: dict[str, Any]) -> str:
    def fmt(value: Any, digits: int = 4) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    q = report["desensitized_vs_original"]
    lines = ["# Privacy report", "",
             f"Method **{report['method']}**" + (f", mask ratio **{report['mask_ratio']:.4f}** (share of pixels "
                                                 "hidden)" if report["mask_ratio"] is not None else
                                                 f", size {report['method_size']}")
             + f"; {report['images']} images"
             + (f" of {report['identities']} identities" if report["identities"] else "")
             + f" at {report['image_size']} px, "
               f"{report['channels']} channel(s); {report['skipped_unreadable']} unreadable input(s) skipped.", "",
             "| desensitized vs original | mean | std |", "|---|---|---|",
             f"| dSSIM (1 - SSIM; higher hides more) | {fmt(q['dssim']['mean'])} | {fmt(q['dssim']['std'])} |",
             f"| PSNR dB (lower hides more; capped at {PSNR_CAP:.0f}) | {fmt(q['psnr']['mean'], 2)} | "
             f"{fmt(q['psnr']['std'], 2)} |", ""]
    attacks = report["attacks"]
    if attacks.get("methods"):
        lines += [f"Classical inpainting attacks on {attacks['images']} images (restored vs original; higher = more "
                  "recovered):", "", "| restoration | PSNR dB | SSIM |", "|---|---|---|",
                  f"| none (masked image) | {fmt(attacks['masked_baseline']['psnr_mean'], 2)} | "
                  f"{fmt(attacks['masked_baseline']['ssim_mean'])} |"]
        lines += [f"| {name} | {fmt(s['psnr_mean'], 2)} | {fmt(s['ssim_mean'])} |"
                  for name, s in attacks["methods"].items()]
    else:
        lines.append(f"Inpainting attacks: {attacks.get('note', 'not run')}.")
    lines += ["", "Learned inpainters (the paper uses RFR-Net) may restore more than these training-free ones.", ""]
    return "\n".join(lines)


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
    layout, plan, ignored = plan_export(job.data, key)
    mask_png = encode_png((mask * 255).astype(np.uint8)) if mask is not None else None
    settings = _settings(job, mask, image_size, size, layout, mask_png)
    done, complete = open_output(job, settings, plan, log)
    out = Path(job.out)
    if complete:
        log(f"{job.out}: the export is already complete and intact; nothing to do")
        return {"files": len(done), "complete": True, "out": str(out), "files_per_s": 0.0, "skipped": None,
                "report": json.loads((out / REPORT_JSON).read_text()) if (out / REPORT_JSON).exists() else None,
                "owner_log": None}
    _write_json(out / STATE, settings)
    if mask_png is not None:
        _write_atomic(out / MASK_FILE, mask_png)

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
        _write_atomic(out / item.rel, data)
        return hashlib.sha256(data).hexdigest()

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
                    entry = {"id": item.id, "pseudonym": item.pseudonym, "path": item.rel, "sha256": digest,
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
    files = [{k: e[k] for k in ("path", "id", "pseudonym", "sha256")} for e in exported]
    fingerprint = hashlib.sha256("".join(f"{f['path']}\0{f['sha256']}\n" for f in files).encode()).hexdigest()[:16]
    report = {
        "format": FORMAT, "version": __version__, "method": job.method, "mask_ratio": settings["mask_ratio"],
        "method_size": size, "image_size": image_size, "channels": job.channels, "images": len(exported),
        "identities": identities, "skipped_unreadable": len(bad),
        "desensitized_vs_original": {"psnr": _stats([e["psnr"] for e in exported]),
                                     "dssim": _stats([e["dssim"] for e in exported])},
        "attacks": (attack_report([planned[e["id"]] for e in sorted(exported, key=lambda e: e["id"])], job, mask,
                                  image_size, progress) if mask is not None else
                    {"images": 0, "methods": {},
                     "note": f"not applicable to --method={job.method} (no hidden pixels)"}),
    }
    _write_json(out / REPORT_JSON, report)
    _write_atomic(out / REPORT_MD, render_report_md(report).encode())
    manifest = {
        "format": FORMAT, "tool": "jaxdesens", "version": __version__, "method": job.method, "layout": layout,
        "settings": {"image_size": image_size, "channels": job.channels, "size": size,
                     "mask_ratio": settings["mask_ratio"]},
        "mask": None if mask is None else {"file": MASK_FILE, "sha256": settings["mask_sha256"],
                                           "shape": list(mask.shape), "fingerprint": mask_io.fingerprint(mask)},
        "counts": {"files": len(files), "identities": identities, "skipped_unreadable": len(bad)},
        "fingerprint": fingerprint, "files": files,
    }
    _write_json(out / MANIFEST, manifest)
    (out / JOURNAL).unlink(missing_ok=True)
    (out / STATE).unlink(missing_ok=True)
    expected = {out / MANIFEST, out / REPORT_JSON, out / REPORT_MD} | {out / f["path"] for f in files}
    if mask is not None:
        expected.add(out / MASK_FILE)
    unexpected = [p for p in _output_files(out) if p not in expected]
    if unexpected:
        raise DataError(f"{job.out}: {len(unexpected)} unexpected file(s) appeared in the export during the run "
                        f"(e.g. {unexpected[0].name}); do not hand it over, export again into a new folder")

    seconds = time.perf_counter() - start_time
    owner = {"export": str(out.resolve()), "input": str(Path(job.data).resolve()), "skipped_unreadable": bad,
             "ignored_non_images": ignored, "exported": len(files), "resumed_from": resumed,
             "files_per_s": round(rate, 1), "seconds": round(seconds, 2)}
    _write_json(owner_log, owner, mode=0o600)  # names original files: as private as the key
    log(f"exported {len(files)} images of {identities} identities to {job.out} ({rate:.0f} files/s); "
        f"{len(bad)} unreadable input(s) skipped" + (f", listed in the owner log {owner_log} (not in the export)"
                                                    if bad else f"; owner log {owner_log}"))
    return {"files": len(files), "identities": identities, "skipped": len(bad), "files_per_s": rate,
            "seconds": seconds, "report": report, "out": str(out), "owner_log": str(owner_log), "complete": True}
