"""Resuming an export: the state file, the journal of finished files, and the output-folder checks.

A journal of finished files (`.jaxdesens-export-journal.jsonl`, ids and digests only) lets a
resumed export skip files whose PNG exists with the journalled digest; the manifest is written
last, atomically, then the journal is removed. A resumed export's manifest is identical to an
uninterrupted one's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxdesens.data.errors import DataError
from jaxdesens.data.export_reader import MANIFEST, MASK_FILE, REPORT_JSON, REPORT_MD, file_digest, read_manifest
from jaxdesens.desensitize.pseudonyms import PlannedFile

STATE = ".jaxdesens-export-state.json"
JOURNAL = ".jaxdesens-export-journal.jsonl"


def manifest_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    s, m = manifest.get("settings", {}), manifest.get("mask") or {}
    return {"format": manifest.get("format"), "version": manifest.get("version"), "method": manifest.get("method"),
            "layout": manifest.get("layout"), "image_size": s.get("image_size"), "channels": s.get("channels"),
            "size": s.get("size"), "mask_fingerprint": m.get("fingerprint"), "mask_ratio": s.get("mask_ratio")}


def differences(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(stored) | set(now))
            if stored.get(k) != now.get(k)]



def output_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()]


def read_journal(out: Path) -> dict[str, dict[str, Any]]:
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


def input_fingerprint(plan: list[PlannedFile]) -> str:
    """Hash of the keyed ids of every input (exported or skipped): tells a finished export whether
    its input changed since, and reveals nothing without the key."""
    return hashlib.sha256("".join(f"{p.id}\n" for p in sorted(plan, key=lambda p: p.id)).encode()).hexdigest()[:16]


def refuse_unexpected(out: Path, expected: set[str], what: str) -> None:
    """Every file of an export is one this tool writes; anything else (a dropped-in original, a
    note) must never be handed over with it."""
    extra = sorted(rel for rel in (p.relative_to(out).as_posix() for p in output_files(out)) if rel not in expected)
    if extra:
        raise DataError(f"{out}: holds {len(extra)} file(s) {what} (e.g. {extra[0]}); remove them, or export again "
                        "into a new folder")


def _finished(out: Path, manifest: dict[str, Any], planned: dict[str, PlannedFile]) -> dict[str, dict[str, Any]]:
    """The files of a finished export after checking that nothing was added to it, its input did
    not change since, and every file is intact."""
    entries = {e["id"]: e for e in manifest.get("files", [])}
    field, digest = file_digest(manifest, out / MANIFEST)
    refuse_unexpected(out, {MANIFEST, MASK_FILE, REPORT_JSON, REPORT_MD} | {e["path"] for e in entries.values()},
                       "not in its manifest")
    skipped = int(manifest.get("counts", {}).get("skipped_unreadable", 0))
    new = len(set(planned) - set(entries)) - skipped
    recorded = manifest.get("input_fingerprint")
    if new > 0:
        raise DataError(f"{out}: {new} image(s) of the input are not in this finished export (added since it "
                        "finished); a finished export is never changed: export again into a new folder")
    if recorded and recorded != input_fingerprint(list(planned.values())):
        raise DataError(f"{out}: the input changed since this export finished (images renamed or removed); a "
                        "finished export is never changed: export again into a new folder")
    broken = [e["path"] for e in entries.values()
              if not (out / e["path"]).is_file() or digest(out / e["path"]) != e.get(field)]
    if broken:
        raise DataError(f"{out}: a finished export whose files are missing or altered ({len(broken)}, e.g. "
                        f"{broken[0]}); export again into a new folder")
    (out / JOURNAL).unlink(missing_ok=True)  # left when killed right after the manifest
    return entries


def open_output(out: Path, resume: bool, settings: dict[str, Any], plan: list[PlannedFile],
                log: Callable[[str], None], digest: Callable[[Path], str]) -> tuple[dict[str, dict[str, Any]], bool]:
    """Prepares the output folder; returns (journal of finished files, export already complete).
    `digest` recomputes a journalled file's digest (keyed by this export's salt)."""
    try:
        entries = list(out.iterdir()) if out.exists() else []
    except OSError as err:
        raise DataError(f"--out={out}: cannot read the output folder ({err.strerror or err})") from err
    if entries and not resume:
        raise DataError(f"{out}: not empty; choose a new output folder, or pass --resume to continue an "
                        "interrupted export into it")
    if not entries:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"--out={out}: cannot create the output folder ({err.strerror or err})") from err
        return {}, False
    planned = {p.id: p for p in plan}
    if (out / STATE).exists():
        try:
            stored = json.loads((out / STATE).read_text())
        except ValueError as err:
            raise DataError(f"{out / STATE}: unreadable export state ({err}); start a new export") from err
        manifest = None
    elif (out / MANIFEST).exists():
        manifest = read_manifest(out)
        stored = manifest_settings(manifest)
    else:
        raise DataError(f"{out}: holds files but no export in progress ({STATE}) or finished "
                        f"({MANIFEST}); choose a new output folder")
    diffs = differences(stored, settings)
    if diffs:
        raise DataError(f"{out}: holds an export with other settings; use the original ones or a new "
                        "folder. Differences (stored -> now):\n  " + "\n  ".join(diffs))
    for leftover in output_files(out):  # temporary files of a killed run (never part of an export)
        if leftover.name.startswith(".") and not (leftover.parent == out and leftover.name in (STATE, JOURNAL)):
            leftover.unlink()
    journal = read_journal(out) if manifest is None else {e["id"]: e for e in manifest.get("files", [])}
    on_disk = {p.stem for p in output_files(out) if p.suffix == ".png" and p.parent != out}
    foreign = (set(journal) | on_disk) - set(planned)
    if foreign:
        raise DataError(f"{out}: holds {len(foreign)} file(s) this input and key do not produce (another "
                        "--key, or the input changed); start a new export")
    wrong_place = [i for i, e in journal.items() if e.get("path") != planned[i].rel]
    if wrong_place:
        raise DataError(f"{out}: {len(wrong_place)} file(s) sit under other pseudonyms (another --key?)")
    if manifest is not None:
        return _finished(out, manifest, planned), True
    refuse_unexpected(out, {STATE, JOURNAL, MANIFEST, MASK_FILE, REPORT_JSON, REPORT_MD} | {p.rel for p in plan},
                       "that this export does not write")
    done = {ident: entry for ident, entry in journal.items()
            if (out / planned[ident].rel).is_file() and digest(out / planned[ident].rel) == entry.get("digest")}
    log(f"resuming: {len(done)} of {len(plan)} files already exported")
    return done, False
