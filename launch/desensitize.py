"""Export a desensitized copy of an image set for hand-off (run by the data owner).

    python launch/desensitize.py --data=FACES --mask=runs/search/mask.png --key=$HOME/owner.key --out=EXPORT
    python launch/desensitize.py --data=FACES --method=blur --image_size=112 --size=18 --key=... --out=EXPORT

FACES is an identity folder (one sub-folder per identity) or a flat folder of images. EXPORT gets
`<pseudonym>/<id>.png` (or `images/<id>.png`) lossless PNGs with no metadata, `mask.png`,
`manifest.json` and `privacy_report.{json,md}`. Pseudonyms, ids and the manifest's file digests
are keyed under the --key file (created if missing; never written to EXPORT); a key per recipient
changes them all but not the pixels, so recipients who pool exports can still link them image by
image. Unreadable inputs are skipped and
listed in an owner-side log next to the key file (--strict stops instead). An interrupted export
continues with --resume. Train on it with `launch/train.py --model=fsm --data=EXPORT`.
"""

from __future__ import annotations

import argparse

import _path  # noqa: F401

from jaxdesens.cli import add_dataclass_flags, add_progress_flag, dataclass_from_args, run
from jaxdesens.desensitize.export import ExportJob

HELP = {
    "data": "input: identity folder (one sub-folder per identity) or a flat folder of images",
    "out": "new output folder (refused if inside the input, or not empty without --resume)",
    "key": "owner's secret key file for pseudonyms, ids and digest salt (created if missing; keep it, never ship "
           "it); another key per recipient does not stop linking by pixels",
    "mask": "mask .png/.npy from launch/search.py (1/255 = visible) for --method=mask",
    "method": "mask (the paper's method), or blur / mosaic for comparison",
    "size": "blur kernel size or mosaic block (default: the paper's strong size for --image_size)",
    "image_size": "output side in pixels (default: the mask's size; required for blur/mosaic)",
    "channels": "3 (greyscale repeated) or 1 (colour converted to luminance)",
    "resume": "continue an interrupted export into --out",
    "strict": "stop at the first unreadable input instead of skipping it",
    "attack_images": "images the inpainting attacks of the privacy report run on",
    "attacks": "comma-separated inpainting attacks (biharmonic,navier-stokes,telea) or none",
    "owner_log": "owner-side log of skipped inputs (default: next to the key file)",
    "batch": "images per batch", "workers": "decode/encode threads (0 = automatic)",
    "check_alignment": "find the faces of 24 sampled images and warn when they do not look aligned (needs the "
                       "faces extra)",
    "audit": "re-identification audit in the privacy report: dlib, one clean gallery photo per person (numbers only "
             "in the export; details in the owner log; needs the faces extra, else the report says it did not run)",
    "audit_probes": "cap on the audit's probes (and people), spread over people (dlib: about 0.1-0.2 s per image per "
                    "condition on a CPU)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_progress_flag(parser, default=True)
    add_dataclass_flags(parser, ExportJob, HELP)
    args = parser.parse_args(argv)
    from jaxdesens.desensitize.export import run_export

    summary = run_export(dataclass_from_args(ExportJob, args), progress=args.progress)
    if summary.get("report"):
        print(f"privacy report: {args.out}/privacy_report.md")


if __name__ == "__main__":
    run(main)
