"""Path checks and atomic writes shared by every command that writes next to its inputs."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """True when `path` is `folder` or lies below it (after resolving both): the test every
    command applies so that its outputs never land in, or overwrite, its inputs."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_output_folder(out: str | Path, inputs: dict[str, str | Path | None],
                        workdirs: Sequence[str | Path] = ()) -> Path:
    """Refuses an `--out` inside one of the input folders (`inputs` maps how each is named in the
    error to its path; None = not given) or equal to a checkpoint workdir; returns it resolved."""
    resolved = Path(out).resolve()
    for name, folder in inputs.items():
        if folder is not None and is_inside(resolved, folder):
            raise ValueError(f"--out={out} lies inside {name}; write results outside the data")
    for workdir in workdirs:
        if resolved == Path(workdir).resolve():
            raise ValueError(f"--out={out} is the checkpoint workdir {workdir}; choose another folder")
    return resolved


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Writes `.<name>.<random>.tmp` beside `path`, then renames it into place: a killed run
    leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, values: Any, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(values, indent=2, sort_keys=True) + "\n").encode(), mode)
