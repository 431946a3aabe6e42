"""From an image set to recognizers trained on its desensitized copy, with one report.

    python launch/pipeline.py [--data=DIR [--align]] [--workdir=runs/pipeline] [--preset=cpu|cpu-full|gpu] [--seed=0]

Trains the clean model, builds the EBP template, searches the mask, exports the desensitized
set, trains the mask and FSM models on the export, runs the ablations of the preset and the
evaluation, and writes WORKDIR/report.md. Every stage keeps its results in the workdir, so a
rerun resumes and skips finished stages. With no --data it runs on the built-in synthetic faces;
with --align, the photos of --data are aligned onto the face template first (WORKDIR/aligned).
"""

from __future__ import annotations

import argparse
import shlex
import sys

import _path  # noqa: F401

from jaxdesens.cli import add_dataclass_flags, add_progress_flag, dataclass_from_args, run
from jaxdesens.jobs.pipeline import PRESETS, PipelineJob

HELP = {"data": "identity folder (one sub-folder per identity); none = the built-in synthetic faces",
        "workdir": "where every stage and the report go (a rerun resumes)",
        "preset": f"stage sizes: {', '.join(PRESETS)}", "seed": "seed of every stage",
        "align": "align the photos of --data onto the face template first (launch/align.py; needs the faces "
                 "extra)"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_progress_flag(parser, default=True)
    add_dataclass_flags(parser, PipelineJob, HELP)
    args = parser.parse_args(argv)
    from jaxdesens.jobs.pipeline import run_pipeline

    command = shlex.join(["python", "launch/pipeline.py", *(argv if argv is not None else sys.argv[1:])])
    run_pipeline(dataclass_from_args(PipelineJob, args), progress=args.progress, command=command)
    print(f"report: {args.workdir}/report.md")


if __name__ == "__main__":
    run(main)
