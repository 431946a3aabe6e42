"""The picture a data owner decides from: privacy against utility, per desensitization.

x: utility, the verification accuracy of a recipient's model for that desensitization (numbers
the caller passes in, e.g. from the held-out evaluation of a model trained on each export);
y: privacy risk, the worst rank-1 re-identification reached on it, restorations included
(`audit.worst_case`), by every attacker of the audit or by the ones named for that point: the
attackers a holder of *that* export has (say dlib and the model trained on it). One line per
family (mask, blur, mosaic) through its strengths; several searched masks (e.g. templates at
different thresholds T) are points of the mask line. Lower right is better.

`utility` maps a base condition (`clean`, `mask:LABEL`, `blur:K`, `mosaic:B`) to an accuracy, or
to `{"accuracy": a, "attackers": [names]}`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from jaxdesens.privacy.audit import worst_case

_STYLE = {"clean": ("black", "*"), "mask": ("tab:blue", "o"), "blur": ("tab:orange", "s"),
          "mosaic": ("tab:green", "^")}


def utility_entry(name: str, value: Any) -> tuple[float, list[str] | None]:
    """(accuracy, attacker names or None) of one utility entry; ValueError naming it if malformed."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value), None
    if isinstance(value, dict) and isinstance(value.get("accuracy"), int | float):
        attackers = value.get("attackers")
        if attackers is None or (isinstance(attackers, list) and all(isinstance(a, str) for a in attackers)):
            return float(value["accuracy"]), attackers
    raise ValueError(f"utility of {name!r}: expected a number or {{\"accuracy\": number, \"attackers\": [names]}}, "
                     f"got {value!r}")


def privacy_utility_points(audit: dict[str, Any], utility: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per desensitization named in `utility`; unknown names are an error, not dropped."""
    bases = {c["base"]: c for c in audit["conditions"]}
    unknown = sorted(set(utility) - set(bases))
    if unknown:
        raise ValueError(f"utility names {unknown} are not conditions of the audit; expected some of {sorted(bases)}")
    points = []
    for base, value in utility.items():
        accuracy, attackers = utility_entry(base, value)
        if attackers is not None:  # an attacker the audit had to skip (say, dlib missing) is left out, not fatal
            attackers = [a for a in attackers if a not in audit.get("skipped", {})] or None
        condition = bases[base]
        points.append({"name": base, "family": condition["family"], "setting": condition["setting"],
                       "hidden": condition["hidden"], "utility": accuracy,
                       "attackers": attackers or sorted(audit["attackers"]),
                       "reidentification": worst_case(audit, base, attackers)})
    return points


def privacy_utility_figure(audit: dict[str, Any], utility: dict[str, Any], path: str | Path,
                           title: str | None = None) -> list[dict[str, Any]]:
    """Draws the figure to `path` (PNG, written atomically) and returns its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = privacy_utility_points(audit, utility)
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
    ax.set_xlabel("utility: verification accuracy of the recipient's model")
    named = any(utility_entry(k, v)[1] for k, v in utility.items())
    ax.set_ylabel("re-identification rank-1 (worst " + ("of each point's attackers" if named else "attacker")
                  + ", restorations included)", fontsize=9)
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
