"""Can whoever holds the export name the people in it? The re-identification audit.

    python launch/audit.py --data=FACES --mask=SEARCH/mask.png [--mask=T0.5=OTHER/mask.png] \
        [--freeform=0.7] [--restorer=RESTORER_WORKDIR] [--recognizer=RECIPIENT_WORKDIR] \
        [--blur=5,10 --mosaic=5,9] [--utility=utility.json] --out=runs/audit
    python launch/audit.py --from_audit=runs/audit/audit.json --utility=utility.json --out=fig.png

A clean gallery photo per person, the other photos desensitized as probes; attackers: dlib's
face descriptor (install the `faces` extra), each --recognizer (a model the recipient trained,
e.g. on the export), the same after restoring hidden pixels (classical inpainting, and the learned
--restorer). Writes audit.json, audit.md, examples.png, and privacy_utility.png when --utility
(a JSON object {condition: verification accuracy}, e.g. {"mask:search": 0.82, "blur:5": 0.85})
is given. The second form only redraws the figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _path  # noqa: F401

from jaxdesens.cli import add_progress_flag, parse_bool, run


def _list(kind):
    def parse(text: str):
        try:
            return tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, "
                                             f"got {text!r}") from err
    return parse


def main(argv: list[str] | None = None) -> None:
    from jaxdesens.metrics.attacks import ATTACK_METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/audit", help="output folder (or the PNG path with --from_audit)")
    p.add_argument("--data", default=None, help="the owner's clean identity folder; none = synthetic faces")
    p.add_argument("--identities", default="kept",
                   help="kept (the identities launch/train.py trains on, i.e. the export's), held_out or all")
    p.add_argument("--holdout", type=float, default=0.25, help="as launch/train.py --holdout")
    p.add_argument("--split_seed", type=int, default=0, help="as launch/train.py --split_seed")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--gallery_per_identity", type=int, default=1, help="clean gallery photos per person")
    p.add_argument("--probes_per_identity", type=int, default=0, help="cap on probes per person (0 = all)")
    p.add_argument("--mask", action="append", default=[], help="PATH or LABEL=PATH of a mask (repeatable)")
    p.add_argument("--freeform", type=_list(float), default=(), help="fixed free-form masks hiding these shares")
    p.add_argument("--blur", type=_list(int), default=None, help="blur kernel sizes (default: the paper's, rescaled)")
    p.add_argument("--mosaic", type=_list(int), default=None, help="mosaic block sizes (default: the paper's)")
    p.add_argument("--classical", type=_list(str), default=ATTACK_METHODS, help="classical inpainting methods")
    p.add_argument("--every_restoration", type=parse_bool, nargs="?", const=True, default=False,
                   help="re-identify after every classical method, not only the best by PSNR")
    p.add_argument("--restorer", default=None, help="workdir of launch/restore.py (the learned attacker)")
    p.add_argument("--recognizer", action="append", default=[], help="workdir of a recipient's model (repeatable)")
    p.add_argument("--attackers", type=_list(str), default=("dlib",), help="off-the-shelf attackers: dlib, pixels")
    p.add_argument("--far", type=float, default=1e-3, help="false accept rate of the TAR column")
    p.add_argument("--seed", type=int, default=0, help="seed of the gallery choice and the free-form masks")
    p.add_argument("--utility", default=None, help="JSON {condition: verification accuracy} for the figure")
    p.add_argument("--from_audit", default=None, help="redraw the figure from this audit.json (with --utility)")
    add_progress_flag(p, default=True)
    args = p.parse_args(argv)
    if args.from_audit:
        if not args.utility:
            raise ValueError("--from_audit needs --utility")
        from jaxdesens.privacy.audit_job import redraw_figure

        redraw_figure(args.from_audit, args.utility, args.out)
        print(f"figure written to {args.out}")
        return
    from jaxdesens.privacy.audit_job import AuditConfig, run_audit

    config = AuditConfig(out=args.out, data=args.data, identities=args.identities, holdout=args.holdout,
                         split_seed=args.split_seed, image_size=args.image_size, channels=args.channels,
                         gallery_per_identity=args.gallery_per_identity, probes_per_identity=args.probes_per_identity,
                         masks=tuple(args.mask), freeform=args.freeform, blur=args.blur, mosaic=args.mosaic,
                         classical=args.classical, every_restoration=args.every_restoration, restorer=args.restorer,
                         recognizers=tuple(args.recognizer), attackers=args.attackers, far=args.far, seed=args.seed,
                         utility=args.utility)
    result = run_audit(config, progress=args.progress)
    print((Path(args.out) / "audit.md").read_text())
    print(f"results in {args.out}/audit.json and audit.md" + (" and privacy_utility.png" if "figure" in result else ""))


if __name__ == "__main__":
    run(main)
