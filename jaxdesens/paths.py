"""Path checks shared by every command that writes next to its inputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


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
