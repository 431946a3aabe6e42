"""Train a recognizer on clean or masked images.

    python launch/train.py --model=resnet|mask|fsm [--data=DIR] [--mask=FILE] --workdir=DIR

With no --data the embedded synthetic identity set is used. Re-running with the same
--workdir resumes from the last checkpoint. Ends with held-out 10-fold verification accuracy.
"""

from __future__ import annotations

import argparse

import _path  # noqa: F401

from jaxdesens.cli import add_dataclass_flags, add_progress_flag, dataclass_from_args, run
from jaxdesens.config import TRAIN_HELP, TrainConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/train", help="checkpoints, metrics and results (resumable)")
    add_progress_flag(parser, default=True)
    add_dataclass_flags(parser, TrainConfig, TRAIN_HELP)
    args = parser.parse_args(argv)
    from jaxdesens.train import train_and_evaluate

    train_and_evaluate(dataclass_from_args(TrainConfig, args), args.workdir, progress=args.progress)
    print(f"results in {args.workdir}/eval.json")


if __name__ == "__main__":
    run(main)
