"""Train the learned restoration attacker (a gated-convolution U-Net) on faces NOT in the export.

    python launch/restore.py --data=FACES [--mask=SEARCH/mask.png] --workdir=runs/restorer [--preset=cpu|gpu]

By default it learns from the identities launch/train.py holds out of the same folder (same
--holdout and --split_seed), i.e. people the export does not contain; --identities=all uses
every identity of --data (an attacker's own public face set). Re-running the same command
resumes from the last checkpoint. launch/audit.py --restorer=WORKDIR uses the result.
"""

from __future__ import annotations

import argparse

import _path  # noqa: F401

from jaxdesens.cli import add_dataclass_flags, add_progress_flag, dataclass_from_args, run
from jaxdesens.privacy.restorer_train import PRESETS, RESTORER_HELP, RestorerConfig


def main(argv: list[str] | None = None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    preset = pre.parse_known_args(argv)[0].preset
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[pre])
    parser.add_argument("--workdir", default="runs/restorer", help="checkpoints and metrics (resumable)")
    add_progress_flag(parser, default=True)
    add_dataclass_flags(parser, RestorerConfig, RESTORER_HELP, defaults=PRESETS[preset])
    args = parser.parse_args(argv)
    from jaxdesens.privacy.restorer_train import train_restorer

    summary = train_restorer(dataclass_from_args(RestorerConfig, args), args.workdir, progress=args.progress)
    print(f"restorer trained on {summary['faces']} faces of {summary['identities']} identities; "
          f"checkpoints in {args.workdir}")


if __name__ == "__main__":
    run(main)
