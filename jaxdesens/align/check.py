"""Does an image folder look aligned? One mask fits a set only if every face sits in one place.

A sample of images is read exactly as the export and the training loader read them (resized and
centre-cropped), here at 112 px, and dlib finds the eye centres and nose base in each. A set is
aligned when those landmarks barely move from image to image: their spread is the RMS distance
of each landmark from its mean position over the sample (averaged over the three landmarks), in
pixels of the 112-px image. Measured on samples of 24 (README, "Align faces"): AT&T faces after
`launch/align.py` spread 1.5-1.6 px; AT&T as shipped (centred portraits, but heads move and turn)
8.5-11 px; AT&T pasted on larger photos under rotations up to 20 degrees, scales 0.8-1.25 and
shifts 9-11 px. The limit, 4 px, sits well above aligned sets and well below the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdesens.align.geometry import TEMPLATE_SIZE, dlib5_points, template
from jaxdesens.data.errors import DataError
from jaxdesens.data.images import load_image

SPREAD_LIMIT_PX = 4.0  # at 112 px
SAMPLE = 24


def landmark_spread(paths: Sequence[str | Path], sample: int = SAMPLE) -> dict[str, Any]:
    """Landmark statistics of an evenly spaced sample of `paths` at 112 px.

    Returns `checked` False with the reason when dlib is not installed; otherwise the number of
    images sampled and with a face, the spread and the mean offset from the template (px), and
    `aligned` (None when too few faces were found to judge).
    """
    from jaxdesens.align.faces import face_finder, faces_available

    missing = faces_available()
    if missing:
        return {"checked": False, "reason": missing}
    chosen = [paths[i] for i in (np.arange(min(sample, len(paths))) * len(paths) // max(1, min(sample, len(paths))))]
    finder = face_finder("hog")
    points = []
    for path in chosen:
        try:
            image = load_image(path, TEMPLATE_SIZE, 1)[..., 0]
        except DataError:
            continue
        found = finder.find(image)
        if found:
            points.append(dlib5_points(found[0].landmarks))
    report: dict[str, Any] = {"checked": True, "sampled": len(chosen), "faces": len(points)}
    if len(points) < max(3, len(chosen) // 2):
        return report | {"aligned": None, "spread_px": None, "offset_px": None}
    points = np.stack(points)
    spread = float(np.sqrt(((points - points.mean(0)) ** 2).sum(-1).mean(0)).mean())
    offset = float(np.linalg.norm(points.mean(0) - template(TEMPLATE_SIZE), axis=1).mean())
    return report | {"aligned": spread <= SPREAD_LIMIT_PX, "spread_px": round(spread, 2), "offset_px": round(offset, 2)}


def alignment_warning(report: dict[str, Any], folder: str) -> str | None:
    """One line for the user when a folder does not look aligned (or could not be checked)."""
    if not report["checked"]:
        return f"{folder}: alignment not checked ({report['reason']})"
    if report["aligned"] is None:
        return (f"{folder}: alignment not checked: dlib found a face in only {report['faces']} of {report['sampled']} "
                "sampled images (not face photos, or faces too small)")
    if not report["aligned"]:
        return (f"{folder}: the faces do not look aligned: eye and nose positions spread {report['spread_px']:.1f} px "
                f"over {report['faces']} sampled images at 112 px (aligned sets: under {SPREAD_LIMIT_PX:.0f} px), so "
                "one mask hides different parts of each face; align them first with launch/align.py")
    return None
