"""The picture a data owner decides from: privacy against utility, per desensitization.

x: utility, the verification accuracy of a recipient's model for that desensitization (numbers
the caller passes in, e.g. from `launch/evaluate.py`); y: privacy risk, the worst rank-1
re-identification any attacker reaches on it, restorations included (`audit.worst_case`).
One line per family (mask, blur, mosaic) through its strengths; several searched masks (e.g.
templates at different thresholds T) are points of the mask line. Lower right is better.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from jaxdesens.privacy.audit import worst_case

_STYLE = {"clean": ("black", "*"), "mask": ("tab:blue", "o"), "blur": ("tab:orange", "s"),
          "mosaic": ("tab:green", "^")}


def privacy_utility_points(audit: dict[str, Any], utility: dict[str, float],
                           attacker: str | None = None) -> list[dict[str, Any]]:
    """One point per desensitization named in `utility` (keys as the audit's base conditions:
    `clean`, `mask:LABEL`, `blur:K`, `mosaic:B`); unknown names are an error, not dropped."""
    bases = {c["base"]: c for c in audit["conditions"]}
    unknown = sorted(set(utility) - set(bases))
    if unknown:
        raise ValueError(f"utility names {unknown} are not conditions of the audit; expected some of {sorted(bases)}")
    points = []
    for base, accuracy in utility.items():
        condition = bases[base]
        points.append({"name": base, "family": condition["family"], "setting": condition["setting"],
                       "hidden": condition["hidden"], "utility": float(accuracy),
                       "reidentification": worst_case(audit, base, attacker)})
    return points


def privacy_utility_figure(audit: dict[str, Any], utility: dict[str, float], path: str | Path,
                           attacker: str | None = None, title: str | None = None) -> list[dict[str, Any]]:
    """Draws the figure to `path` (PNG) and returns its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = privacy_utility_points(audit, utility, attacker)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for family, (colour, marker) in _STYLE.items():
        members = sorted((p for p in points if p["family"] == family), key=lambda p: p["utility"])
        if not members:
            continue
        ax.plot([p["utility"] for p in members], [p["reidentification"] for p in members], color=colour,
                marker=marker, linestyle="-" if len(members) > 1 else "none", label=family)
        for p in members:
            ax.annotate(p["setting"] or p["name"], (p["utility"], p["reidentification"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    chance = audit["results"][0]["rank1_chance"] if audit["results"] else None
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.1%})")
    who = attacker or "worst attacker, restorations included"
    ax.set_xlabel("utility: verification accuracy of the recipient's model")
    ax.set_ylabel(f"re-identification rank-1 ({who})")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "Privacy against utility (lower right is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return points
