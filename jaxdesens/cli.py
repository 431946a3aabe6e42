"""Shared command-line plumbing: dataclass fields as flags, and errors printed without tracebacks."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from jaxdesens.data.errors import DataError


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_progress_flag(parser: argparse.ArgumentParser, default: bool = True) -> None:
    parser.add_argument("--progress", type=parse_bool, nargs="?", const=True, default=default, metavar="BOOL",
                        help=f"show progress bars (default {default})")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, help: dict[str, str] | None = None,
                        defaults: dict[str, Any] | None = None) -> None:
    """One `--field=value` flag per dataclass field, typed and defaulted from the dataclass
    (or from `defaults`, where a command's default differs from the library's)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        default = (defaults or {}).get(field.name, field.default)
        kind = hints[field.name]
        optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
        if optional:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        text = (help or {}).get(field.name, "")
        if kind is bool:
            parser.add_argument(f"--{field.name}", type=parse_bool, nargs="?", const=True, default=default,
                                metavar="BOOL", help=f"{text} (default {default})")
        else:
            parser.add_argument(f"--{field.name}", type=kind, default=default, help=f"{text} (default {default})")


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def run(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Runs a CLI main; user errors become one clear line on stderr and exit status 2."""
    from jaxdesens.workdir import ResumeError

    try:
        main(argv)
    except (DataError, ResumeError, ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
