"""Search a desensitization mask (Algorithm 1) with a clean recognizer's checkpoint.

    python launch/search.py --checkpoint=WORKDIR [--data=DIR] --n=2000 --T=0.5 --K=64 \
        --out=DIR --seed=0 [--objective=verification|ce] [--gamma=G] [--batch_images=B]

Builds the EBP template S from K training images (or from occlusion sensitivity with
--saliency=occlusion), measures how faithful it is to occlusion, scores n free-form candidates
max(m_r, S) in vmapped chunks, and writes the best mask (mask.png / mask.npy), the candidate
table, figures and a held-out verification comparison. --without_ebp and --level=L give the
paper's ablations.
"""

from __future__ import annotations

import argparse

import _path  # noqa: F401

from jaxdesens.cli import add_dataclass_flags, add_progress_flag, dataclass_from_args, run
from jaxdesens.jobs.search import SearchJob

HELP = {
    "checkpoint": "workdir of a clean model from launch/train.py --model=resnet",
    "out": "output folder (mask, template, candidate table, figures)",
    "data": "the data the checkpoint was trained on (default: the one recorded in its workdir)",
    "n": "number of candidate masks", "T": "saliency threshold of the template (Formula 4)",
    "K": "images averaged into the mean saliency map",
    "gamma": "weight of the mask ratio in the objective (default: the loss at chance, ln(number of classes) for "
             "ce, 0.5 for verification)",
    "objective": "what a candidate must keep: verification (the default: the pair error of the masked images' "
                 "embeddings, same identity against not; it predicts held-out verification and hides more, see the "
                 "README) or ce (the paper's: the classifier's cross-entropy on the masked images)",
    "batch_images": "labelled images B each candidate is scored on (default: 128 for verification, 4 per identity; "
                    "32 for ce)",
    "chunk": "masks per vmapped scoring call, split over the devices (0 = 32 per CPU device, or from each "
             "accelerator's memory)",
    "without_ebp": "ablation: no template (S empty)",
    "seed": "seed of the candidates and of the template and scoring images",
    "contrastive": "contrastive EBP (target minus the dual pass) rather than plain EBP",
    "random_repeats": "random same-ratio masks the searched mask is compared with",
    "level": "Section 4.2 baseline: candidates from this hole-ratio level (0..5) instead of free-form strokes",
    "min_ratio": "policy floor: candidates hiding less than this share are rejected",
    "adapt_floor": "lower the floor to 90%% of what the template leaves hideable when T keeps too much",
    "bf16": "score in bfloat16", "evaluate": "compare held-out verification under the mask and random masks",
    "saliency_layer": "layer the EBP map is read at", "contrast_layer": "layer the contrastive signal is taken at",
    "saliency": "what the template is made from: ebp (the paper's contrastive Excitation Backprop) or occlusion "
                "(the rise in cross-entropy when a patch is hidden)",
    "occlusion_patch": "side of the occlusion patch in pixels (0 = an eighth of the image side)",
    "occlusion_stride": "step between occlusion patches (0 = half the patch)",
    "faithfulness": "measure the template against occlusion (summary.json, faithfulness.png)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_progress_flag(parser, default=True)
    add_dataclass_flags(parser, SearchJob, HELP, defaults={"out": "runs/search"})
    args = parser.parse_args(argv)
    from jaxdesens.jobs.search import run_search_job

    run_search_job(dataclass_from_args(SearchJob, args), progress=args.progress)
    print(f"mask written to {args.out}/mask.png and {args.out}/mask.npy")


if __name__ == "__main__":
    run(main)
