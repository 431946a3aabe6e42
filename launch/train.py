"""Train a recognizer on clean or masked images.

    python launch/train.py --model=resnet|mask|fsm [--data=DIR] [--mask=FILE] --workdir=DIR

With no --data the embedded synthetic identity set is used. Re-running with the same
--workdir resumes from the last checkpoint. Ends with held-out 10-fold verification accuracy.
"""

from __future__ import annotations

import argparse

import _path  # noqa: F401

from jaxdesens.cli import add_dataclass_flags, add_progress_flag, dataclass_from_args, run
from jaxdesens.config import TrainConfig

HELP = {
    "model": "resnet (clean images), mask (masked images) or fsm (masked images + FSM branch)",
    "data": "identity folder, desensitized export or array_record set; none = synthetic faces",
    "mask": "mask file (.png or .npy, 1/255 = visible) for --model=mask|fsm; none = random level masks",
    "fsm_after": "insert the FSM gate after layer 1..4",
    "depth": "ResNet depth, 18 or 34",
    "width": "channel width multiplier (1.0 = 64..512 channels)",
    "holdout": "share of identities held out (never trained on) for verification",
    "bf16": "bfloat16 compute with float32 parameters",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/train", help="checkpoints, metrics and results (resumable)")
    add_progress_flag(parser, default=True)
    add_dataclass_flags(parser, TrainConfig, HELP)
    args = parser.parse_args(argv)
    from jaxdesens.train import train_and_evaluate

    train_and_evaluate(dataclass_from_args(TrainConfig, args), args.workdir, progress=args.progress)
    print(f"results in {args.workdir}/eval.json")


if __name__ == "__main__":
    run(main)
