"""Resuming an export: the state file, the journal of finished files, and the output-folder checks.

A journal of finished files (`.jaxdesens-export-journal.jsonl`, ids and hashes only) lets a
resumed export skip files whose PNG exists with the journalled sha256; the manifest is written
last, atomically, then the journal is removed. A resumed export's manifest is identical to an
uninterrupted one's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxdesens.data.errors import DataError
from jaxdesens.data.export_reader import MANIFEST, read_manifest, sha256_file
from jaxdesens.desensitize.pseudonyms import PlannedFile

STATE = ".jaxdesens-export-state.json"
JOURNAL = ".jaxdesens-export-journal.jsonl"


def manifest_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    s, m = manifest.get("settings", {}), manifest.get("mask") or {}
    return {"format": manifest.get("format"), "version": manifest.get("version"), "method": manifest.get("method"),
            "layout": manifest.get("layout"), "image_size": s.get("image_size"), "channels": s.get("channels"),
            "size": s.get("size"), "mask_sha256": m.get("sha256"), "mask_ratio": s.get("mask_ratio")}


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


def open_output(out: Path, resume: bool, settings: dict[str, Any], plan: list[PlannedFile],
                log: Callable[[str], None]) -> tuple[dict[str, dict[str, Any]], bool]:
    """Prepares the output folder; returns (journal of finished files, export already complete)."""
    entries = list(out.iterdir()) if out.exists() else []
    if entries and not resume:
        raise DataError(f"{out}: not empty; choose a new output folder, or pass --resume to continue an "
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
            stored = manifest_settings(read_manifest(out))
            complete = True
        else:
            raise DataError(f"{out}: holds files but no export in progress ({STATE}) or finished "
                            f"({MANIFEST}); choose a new output folder")
        diffs = differences(stored, settings)
        if diffs:
            raise DataError(f"{out}: holds an export with other settings; use the original ones or a new "
                            "folder. Differences (stored -> now):\n  " + "\n  ".join(diffs))
        for leftover in output_files(out):  # temporary files of a killed run
            if leftover.name.startswith(".") and leftover.parent == out and leftover.name in (STATE, JOURNAL):
                continue
            if leftover.name.startswith("."):
                leftover.unlink()
        journal = read_journal(out)
        if complete:
            journal = {e["id"]: e for e in read_manifest(out).get("files", [])}
        on_disk = {p.stem for p in output_files(out) if p.suffix == ".png" and p.parent != out}
        foreign = (set(journal) | on_disk) - set(planned)
        if foreign:
            raise DataError(f"{out}: holds {len(foreign)} file(s) this input and key do not produce (another "
                            "--key, or the input changed); start a new export")
        wrong_place = [i for i, e in journal.items() if e.get("path") != planned[i].rel]
        if wrong_place:
            raise DataError(f"{out}: {len(wrong_place)} file(s) sit under other pseudonyms (another --key?)")
        done = {}
        for ident, entry in journal.items():
            file = out / planned[ident].rel
            if file.is_file() and sha256_file(file) == entry.get("sha256"):
                done[ident] = entry
        if complete:
            if len(done) != len(journal):
                raise DataError(f"{out}: a finished export whose files are missing or altered "
                                f"({len(journal) - len(done)}); export again into a new folder")
            (out / JOURNAL).unlink(missing_ok=True)  # left when killed right after the manifest
            return done, True
        log(f"resuming: {len(done)} of {len(plan)} files already exported")
        return done, False
    out.mkdir(parents=True, exist_ok=True)
    return {}, False
