"""Path checks shared by every command that writes next to its inputs."""

from __future__ import annotations

from pathlib import Path


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """True when `path` is `folder` or lies below it (after resolving both): the test every
    command applies so that its outputs never land in, or overwrite, its inputs."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents
