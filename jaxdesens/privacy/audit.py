"""The re-identification audit: can whoever holds the export name the people in it?

Threat model: the attacker holds the desensitized images (the probes; with a mask export, also
the mask, which ships with it), clean photos of the candidate people (the gallery: one or more
per person, never the probe photos themselves) and a face recognizer, off-the-shelf or trained
on the export; it may restore hidden pixels first. Each (attacker, probe condition) pair gets
rank-1 identification and TAR at FAR beside their chance levels (`reid.identification_report`).

`desensitization_conditions` builds the probe conditions (clean, each mask, each mask after its
best classical and the learned restoration, blur and mosaic at given sizes);
`reidentification_audit` scores them; `audit_markdown` renders the result. Callers (the audit
CLI, and later the evaluation, export and pipeline reports) need only these three.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxdesens.desensitize.operators import apply_mask, gaussian_blur, mosaic
from jaxdesens.metrics.quality import SSIM_WINDOW, psnr, ssim
from jaxdesens.privacy.attackers import Attacker
from jaxdesens.privacy.reid import identification_report

FAMILIES = ("clean", "mask", "blur", "mosaic")


@dataclasses.dataclass(frozen=True)
class Condition:
    """One way the attacker receives the probes. `mask` is set while the probes are still masked
    (restored probes are whole images); `name` is `family[:setting][+restoration]`."""

    family: str
    setting: str | None
    probes: np.ndarray
    restoration: str | None = None
    mask: np.ndarray | None = None
    hidden: float | None = None

    @property
    def name(self) -> str:
        base = self.family if self.setting is None else f"{self.family}:{self.setting}"
        return base if self.restoration is None else f"{base}+{self.restoration}"

    @property
    def base(self) -> str:
        """The desensitization this condition comes from (its name without the restoration)."""
        return self.name.split("+")[0]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def image_quality(originals: np.ndarray, images: np.ndarray, batch: int = 256) -> dict[str, float | None]:
    """Mean PSNR (None when identical: infinite) and SSIM (None on images under its 11 px window)."""
    chunks = range(0, len(originals), batch)
    p = np.concatenate([np.asarray(psnr(originals[i:i + batch], images[i:i + batch])) for i in chunks])
    if min(originals.shape[1:3]) < SSIM_WINDOW:
        return {"psnr": _finite(p.mean()), "ssim": None}
    s = np.concatenate([np.asarray(ssim(originals[i:i + batch], images[i:i + batch])) for i in chunks])
    return {"psnr": _finite(p.mean()), "ssim": float(s.mean())}


def desensitization_conditions(
    probes: np.ndarray,
    masks: dict[str, np.ndarray],
    blur: Sequence[int] = (),
    mosaic_blocks: Sequence[int] = (),
    classical: Sequence[str] = (),
    restorer: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    every_restoration: bool = False,
    progress: bool = False,
) -> tuple[list[Condition], list[dict[str, Any]]]:
    """The probe conditions and a restoration table (PSNR/SSIM of every restoration per mask).

    For each mask, the masked probes, then the best classical inpainting by PSNR (every one with
    `every_restoration`) and the learned `restorer(masked, mask)`, each as a condition of its own.
    """
    from jaxdesens.metrics.attacks import inpaint

    probes = np.asarray(probes, np.float32)
    conditions = [Condition("clean", None, probes)]
    restorations: list[dict[str, Any]] = []
    for label, mask in masks.items():
        mask = np.asarray(mask, np.float32)
        masked = np.asarray(apply_mask(probes, mask))
        hidden = float(1.0 - mask.mean())
        conditions.append(Condition("mask", label, masked, mask=mask, hidden=hidden))
        restorations.append({"mask": label, "method": "none (masked)", "hidden": hidden,
                             **image_quality(probes, masked)})
        restored = {}
        for method in classical:
            restored[method] = inpaint(masked, mask, method, progress=progress)
            restorations.append({"mask": label, "method": method, "hidden": hidden,
                                 **image_quality(probes, restored[method])})
        if classical:
            scores = {r["method"]: r["psnr"] or math.inf for r in restorations[-len(classical):]}
            best = max(scores, key=scores.get)
            for method in classical if every_restoration else [best]:
                conditions.append(Condition("mask", label, restored[method], restoration=method, hidden=hidden))
        if restorer is not None:
            learned = np.asarray(restorer(masked, mask), np.float32)
            restorations.append({"mask": label, "method": "learned", "hidden": hidden,
                                 **image_quality(probes, learned)})
            conditions.append(Condition("mask", label, learned, restoration="learned", hidden=hidden))
    for size in blur:
        conditions.append(Condition("blur", str(size), np.asarray(gaussian_blur(probes, size))))
    for block in mosaic_blocks:
        conditions.append(Condition("mosaic", str(block), np.asarray(mosaic(probes, block))))
    return conditions, restorations


def reidentification_audit(
    gallery_images: np.ndarray,
    gallery_labels: np.ndarray,
    probe_labels: np.ndarray,
    conditions: Sequence[Condition],
    attackers: Sequence[Attacker],
    *,
    far: float = 1e-3,
    unavailable: dict[str, str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every attacker against every condition; JSON-ready.

    `unavailable` maps attackers that could not run to the reason; they are listed in the result
    (and the report) as skipped with that reason, never silently left out. Attackers receive images
    (and a masked condition's mask) only, never labels.
    """
    from tqdm.auto import tqdm

    clean = conditions[0].probes if conditions and conditions[0].family == "clean" else None
    rows, described = [], {}
    pairs = [(a, c) for a in attackers for c in conditions]
    bar = tqdm(total=len(pairs), disable=not progress, desc="re-identification", unit="condition")
    for attacker in attackers:
        gallery = attacker.embed_gallery(np.asarray(gallery_images, np.float32))
        described[attacker.name] = {"metric": attacker.metric, **getattr(attacker, "notes", {})}
        for condition in conditions:
            probes = attacker.embed_probes(condition.probes, condition.mask)
            report = identification_report(probes, probe_labels, gallery, gallery_labels, attacker.metric, far)
            rows.append({"attacker": attacker.name, "condition": condition.name, **report})
            bar.update(1)
    bar.close()
    return {
        "warnings": attacker_warnings(described),
        "far": far,
        "gallery": {"images": int(len(gallery_labels)), "identities": int(len(np.unique(gallery_labels)))},
        "probes": int(len(probe_labels)),
        "conditions": [{"name": c.name, "base": c.base, "family": c.family, "setting": c.setting,
                        "restoration": c.restoration, "hidden": c.hidden,
                        **(image_quality(clean, c.probes) if clean is not None else {})} for c in conditions],
        "attackers": described,
        "skipped": dict(unavailable or {}),
        "results": rows,
    }


def attacker_warnings(attackers: dict[str, dict[str, Any]]) -> list[str]:
    """Attackers whose numbers mean less than they seem: a face recognizer that found no face in
    some clean gallery photos (synthetic or very small faces) described the whole frame instead."""
    warnings = []
    for name, notes in attackers.items():
        found, total = notes.get("gallery_faces_detected"), notes.get("gallery_images")
        if found is not None and total and found < total:
            warnings.append(f"{name} found a face in only {found} of {total} clean gallery photos; where it found "
                            "none it described the whole frame with guessed landmarks, so its numbers on these images "
                            "say little about real photos")
    return warnings


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def audit_markdown(audit: dict[str, Any], restorations: Sequence[dict[str, Any]] = ()) -> str:
    """The audit as Markdown: one row per condition, rank-1 and TAR per attacker, chance beside."""
    # in the order they ran (a JSON round trip may sort the attackers' dict), then any without results
    attackers = list(dict.fromkeys([r["attacker"] for r in audit["results"]] + list(audit["attackers"])))
    by_key = {(r["attacker"], r["condition"]): r for r in audit["results"]}
    first = audit["results"][0] if audit["results"] else None
    lines = ["## Re-identification audit", ""]
    if first:
        lines += [f"Gallery: {audit['gallery']['images']} clean photo(s) of {audit['gallery']['identities']} people; "
                  f"{audit['probes']} desensitized probes of the same people (never in the gallery). Chance: rank-1 "
                  f"{_percent(first['rank1_chance'])}, TAR at FAR={audit['far']:g} {_percent(first['tar_chance'])} "
                  f"({first['impostor_comparisons']} impostor comparisons: each probe against every other person's "
                  "gallery photos" + ("; n/a: fewer than 1/FAR of them, so not even one false accept could be "
                                      "allowed" if first["tar"] is None else "") + ").", ""]
    header = "| probes | hidden | PSNR (dB) | " + " | ".join(f"{a} rank-1 | {a} TAR" for a in attackers) + " |"
    lines += [header, "|" + "---|" * (3 + 2 * len(attackers))]
    for c in audit["conditions"]:
        cells = []
        for a in attackers:
            r = by_key[(a, c["name"])]
            cells += [_percent(r["rank1"]), _percent(r["tar"])]
        quality = "-" if c.get("psnr") is None else f"{c['psnr']:.1f}"
        lines.append(f"| {c['name']} | {_percent(c['hidden']) if c['hidden'] is not None else '-'} | {quality} | "
                     + " | ".join(cells) + " |")
    for name, reason in audit["skipped"].items():
        lines += ["", f"**Attacker {name} skipped**: {reason}"]
    for warning in audit.get("warnings", []):
        lines += ["", f"**Warning**: {warning}."]
    for name, notes in audit["attackers"].items():
        extra = {k: v for k, v in notes.items() if k != "metric"}
        if extra:
            lines += ["", f"{name}: " + "; ".join(f"{k}: {v}" for k, v in extra.items())]
    if restorations:
        lines += ["", "### Restoration attacks (restored vs original probes)", "",
                  "| mask | hidden | method | PSNR (dB) | SSIM |", "|---|---|---|---|---|"]
        for r in restorations:
            psnr_text = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
            ssim_text = "n/a" if r["ssim"] is None else f"{r['ssim']:.3f}"
            lines.append(f"| {r['mask']} | {_percent(r['hidden'])} | {r['method']} | {psnr_text} | {ssim_text} |")
    if audit.get("assumptions"):
        lines += ["", "Assumptions:", ""] + [f"- {a}" for a in audit["assumptions"]]
    return "\n".join(lines) + "\n"


def worst_case(audit: dict[str, Any], base: str, attackers: Sequence[str] | None = None) -> float:
    """The highest rank-1 any of `attackers` (all with None) reaches on `base` or any restoration of it."""
    known = set(audit["attackers"])
    if attackers is not None and set(attackers) - known:
        raise ValueError(f"attackers {sorted(set(attackers) - known)} are not in the audit; it has {sorted(known)}")
    values = [r["rank1"] for r in audit["results"]
              if r["condition"].split("+")[0] == base and (attackers is None or r["attacker"] in attackers)]
    if not values:
        raise ValueError(f"the audit has no results for {base!r}")
    return max(values)
