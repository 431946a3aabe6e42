r"""Evaluate utility and privacy of trained recognizers: the paper's Tables 1-5 and restoration attacks.

    python launch/evaluate.py --checkpoint=WORKDIR [--checkpoint=WORKDIR ...] [--data=DIR] \
        --mask=MASK.png --out=DIR [--lfw_pairs=pairs.txt --lfw_root=DIR] [--flip] \
        [--repeats=5] [--baseline_n=200] [--attacks=all] [--attack_images=100] [--seed=0] \
        [--audit=true --audit_probes=100 --restorer=RESTORER_WORKDIR]

Each checkpoint's role (resnet, resnet-mask, resnet-fsm) comes from its run.json. The test
pairs are the checkpoints' held-out identities of --data (default: the data they were trained
on), or LFW pairs with --lfw_pairs/--lfw_root. The re-identification audit (dlib and the mask /
FSM checkpoints as the recipient's models, on the checkpoints' training identities) and
privacy_utility.png come with it unless --audit=false. Writes results.json, report.md and figures.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import _path  # noqa: F401

from jaxdesens.cli import add_dataclass_flags, add_progress_flag, dataclass_from_args, run
from jaxdesens.jobs.evaluate import EvaluateJob

HELP = {
    "mask": "the searched mask (.png or .npy, 1/255 = visible), e.g. from launch/search.py",
    "out": "output folder (results.json, report.md, figures); not inside --data or a checkpoint workdir",
    "data": "identity folder the checkpoints were trained on (default: the one recorded in the first workdir); "
            "its held-out identities are the test set, its training identities score the Table 2 baseline",
    "lfw_pairs": "LFW pairs.txt: test on these pairs instead of the held-out identities",
    "lfw_root": "LFW image root (Name/Name_0001.jpg), with --lfw_pairs",
    "test_data": "identity folder of test identities no model trained on (all of them are used for pairs)",
    "flip": "flip-augmented embeddings (embedding of the image plus its mirror)",
    "repeats": "Table 1: repeats of the random level masks (the paper: 5)",
    "baseline_n": "Table 2: random masks scored per hole-ratio level (0 skips Table 2)",
    "baseline_images": "Table 2: training images each baseline mask is scored on",
    "baseline_gamma": "Table 2: weight of the ratio in Formula 3 (default ln(number of classes))",
    "baseline_attack": "Table 2: inpainting used for the 'inpainted' columns",
    "attacks": "restoration attacks on the searched mask: all, none or a comma list of biharmonic,navier-stokes,telea",
    "attack_images": "test images the attacks restore (a fixed subset; 0 = all; biharmonic is slow)",
    "examples": "test faces in examples.png", "batch_size": "images per embedding call",
    "seed": "seed of the random level masks, the baseline candidates, the attack subset and the audit's gallery",
    "audit": "re-identification audit of the checkpoints' training identities (dlib costs about 0.1-0.2 s per "
             "image per condition on a CPU)",
    "audit_probes": "cap on the audit's probes, spread over people (0 = every photo but the gallery's)",
    "audit_attackers": "off-the-shelf attackers of the audit: dlib, pixels (comma list; empty = only the mask/FSM "
                       "checkpoints as the recipient's models)",
    "restorer": "workdir of launch/restore.py: the audit also re-identifies after this learned restoration",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     conflict_handler="resolve")
    add_progress_flag(parser, default=True)
    add_dataclass_flags(parser, EvaluateJob, HELP, defaults={"out": "runs/evaluate"})
    # One --checkpoint per model (repeatable); replaces the generic --checkpoints flag.
    parser.add_argument("--checkpoint", "--checkpoints", dest="checkpoints", action="append", default=[],
                        metavar="WORKDIR", help="training workdir of a model (repeat for several models)")
    args = parser.parse_args(argv)
    from jaxdesens.jobs.evaluate import run_evaluate_job

    command = shlex.join(["python", "launch/evaluate.py", *argv])
    job = dataclass_from_args(EvaluateJob, args)
    run_evaluate_job(job, progress=args.progress, command=command)
    print(f"report written to {job.out}/report.md (numbers in {job.out}/results.json)")


if __name__ == "__main__":
    run(main)
