"""Align a collection of face photos onto one template, so one mask fits every face.

    python launch/align.py --data=RAW --out=ALIGNED [--size=112] [--detector=hog|cnn]

RAW holds identity folders of photos (or photos); ALIGNED gets the same layout with one
SIZE x SIZE PNG per photo: the largest face, its eye centres and nose base moved onto ArcFace's
112x112 template (scaled to SIZE) by a similarity transform. Photos with no face, with several
faces (the largest is used) and unreadable files are listed in ALIGNED.align-log.json next to
ALIGNED. Rerunning the same command resumes. Needs the `faces` extra: pip install 'jaxdesens[faces]'.
"""

from __future__ import annotations

import argparse

import _path  # noqa: F401

from jaxdesens.align.folder import AlignJob
from jaxdesens.cli import add_dataclass_flags, add_progress_flag, dataclass_from_args, run

HELP = {"data": "photos: identity folders (one sub-folder per person) or a flat folder",
        "out": "new output folder (same layout; a rerun into it resumes)",
        "size": "output side in pixels (the 112-px template is scaled to it)",
        "detector": "hog (fast, frontal faces) or cnn (slower; turned and small faces)"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_progress_flag(parser, default=True)
    add_dataclass_flags(parser, AlignJob, HELP)
    args = parser.parse_args(argv)
    from jaxdesens.align.folder import run_align

    run_align(dataclass_from_args(AlignJob, args), progress=args.progress)


if __name__ == "__main__":
    run(main)
