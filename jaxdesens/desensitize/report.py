"""The export's privacy report: mask ratio, dSSIM/PSNR against the originals, inpainting attacks,
and re-identification by an off-the-shelf face recognizer.

The report ships inside the export, so it holds numbers and fixed wording only: the audit's
gallery (clean photos) stays with the owner, and no name, pseudonym, id, path or image, nor which
photo was identified, enters it (`public_audit`); the whole audit goes to the owner log.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PSNR_CAP = 100.0  # dB; identical images (PSNR = inf) count as 100 dB so means stay finite
ATTACKS = ("biharmonic", "navier-stokes", "telea")


def batch_quality(originals: np.ndarray, outputs: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (capped at `PSNR_CAP`) and dSSIM of the written outputs vs the originals."""
    from jaxdesens.metrics.quality import SSIM_WINDOW, dssim, psnr

    n = len(originals)
    pad = lambda x: np.concatenate([x, np.repeat(x[:1], batch - n, 0)]) if n < batch else x  # noqa: E731
    a, b = pad(originals).astype(np.float32) / 255.0, pad(outputs).astype(np.float32) / 255.0
    p = np.minimum(np.asarray(psnr(a, b))[:n], PSNR_CAP)
    d = np.asarray(dssim(a, b))[:n] if min(a.shape[1:3]) >= SSIM_WINDOW else np.full(n, np.nan)
    return p.astype(np.float64), d.astype(np.float64)


def stats(values: list[float]) -> dict[str, float | None]:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if not len(values):
        return {"mean": None, "std": None}
    return {"mean": round(float(values.mean()), 6), "std": round(float(values.std()), 6)}


def _finite(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None


def attack_report(originals: np.ndarray, mask: np.ndarray, methods: tuple[str, ...],
                  progress: bool) -> dict[str, Any]:
    """Classical inpainting of uint8 `originals` under `mask`: PSNR/SSIM of the restorations."""
    from jaxdesens.metrics.attacks import restoration_report

    if not len(originals) or not methods:
        return {"images": 0, "methods": {}, "note": "no attack run (--attack_images=0 or --attacks=none)"}
    images = originals.astype(np.float32) / 255.0
    report = restoration_report(images, images * mask[None, :, :, None], mask, methods, progress=progress)
    pick = lambda s: {k: _finite(s[k]) for k in ("psnr_mean", "psnr_std", "ssim_mean", "ssim_std")}  # noqa: E731
    return {"images": len(originals), "masked_baseline": pick(report["baseline"]),
            "methods": {name: pick(values) for name, values in report["methods"].items()}}


def render_report_md(report: dict[str, Any]) -> str:
    def fmt(value: Any, digits: int = 4) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    q = report["desensitized_vs_original"]
    lines = ["# Privacy report", "",
             f"Method **{report['method']}**" + (f", mask ratio **{report['mask_ratio']:.4f}** (share of pixels "
                                                 "hidden)" if report["mask_ratio"] is not None else
                                                 f", size {report['method_size']}")
             + f"; {report['images']} images"
             + (f" of {report['identities']} identities" if report["identities"] else "")
             + f" at {report['image_size']} px, "
               f"{report['channels']} channel(s); {report['skipped_unreadable']} unreadable input(s) skipped.", "",
             "| desensitized vs original | mean | std |", "|---|---|---|",
             f"| dSSIM (1 - SSIM; higher hides more) | {fmt(q['dssim']['mean'])} | {fmt(q['dssim']['std'])} |",
             f"| PSNR dB (lower hides more; capped at {PSNR_CAP:.0f}) | {fmt(q['psnr']['mean'], 2)} | "
             f"{fmt(q['psnr']['std'], 2)} |", ""]
    attacks = report["attacks"]
    if attacks.get("methods"):
        lines += [f"Classical inpainting attacks on {attacks['images']} images (restored vs original; higher = more "
                  "recovered):", "", "| restoration | PSNR dB | SSIM |", "|---|---|---|",
                  f"| none (masked image) | {fmt(attacks['masked_baseline']['psnr_mean'], 2)} | "
                  f"{fmt(attacks['masked_baseline']['ssim_mean'])} |"]
        lines += [f"| {name} | {fmt(s['psnr_mean'], 2)} | {fmt(s['ssim_mean'])} |"
                  for name, s in attacks["methods"].items()]
    else:
        lines.append(f"Inpainting attacks: {attacks.get('note', 'not run')}.")
    lines += ["", "Learned inpainters (the paper uses RFR-Net) may restore more than these training-free ones."]
    lines += _audit_md(report.get("reidentification", {"run": False, "note": "not run (an older export)"}))
    lines += ["", "Pixels are identical in every export of these images with this mask, whatever the key: "
              "recipients who pool exports can link them image by image.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ re-identification audit
AUDIT_ATTACKER = "dlib's 128-d ResNet face descriptor, an off-the-shelf face recognizer nobody here trained"
AUDIT_GALLERY = "one clean photo per person, from the owner's originals (kept by the owner, not in the export)"
AUDIT_NOT_RUN = ("not run: the off-the-shelf face recognizer (dlib, the `faces` extra) was not installed where the "
                 "export was made")


def audit_sample(files: list[tuple[str, Any]], probes: int) -> list[tuple[str, Any]]:
    """The (person, file) pairs the audit reads: up to `probes` people with two or more files, evenly
    spread over the (random-looking) pseudonyms, each with 1 + ceil(probes / people) of its files,
    so loading stays bounded on large sets."""
    by_person: dict[str, list[Any]] = {}
    for person, file in files:
        by_person.setdefault(person, []).append(file)
    people = sorted(p for p, members in by_person.items() if len(members) >= 2)
    if not people or probes <= 0:
        return []
    count = min(probes, len(people))
    per_person = 1 + -(-probes // count)
    chosen = [people[i] for i in np.arange(count) * len(people) // count]
    return [(person, file) for person in chosen for file in by_person[person][:per_person]]


def _public_name(condition: dict[str, Any]) -> str:
    """`clean`, `export` or `export+<restoration>`: the audit's names without the owner's labels."""
    if condition["family"] == "clean":
        return "clean"
    return "export" + (f"+{condition['restoration']}" if condition["restoration"] else "")


def public_audit(audit: dict[str, Any]) -> dict[str, Any]:
    """What of an audit may ship in the export: counts, rates and fixed wording only (no names,
    pseudonyms, ids, paths, images, nor which photo was identified)."""
    hidden = {c["name"]: c["hidden"] for c in audit["conditions"]}
    names = {c["name"]: _public_name(c) for c in audit["conditions"]}
    first = audit["results"][0]
    notes = audit["attackers"].get("dlib", {})
    return {"run": True, "attacker": AUDIT_ATTACKER, "gallery": AUDIT_GALLERY,
            "people": audit["gallery"]["identities"], "probes": audit["probes"], "far": audit["far"],
            "rank1_chance": first["rank1_chance"], "tar_chance": first["tar_chance"],
            "gallery_faces_detected": notes.get("gallery_faces_detected"), "warnings": list(audit["warnings"]),
            "results": [{"probes": names[r["condition"]], "hidden": hidden[r["condition"]], "rank1": r["rank1"],
                         "tar": r["tar"]} for r in audit["results"]]}


def reidentification_report(originals: np.ndarray, labels: np.ndarray, method: str, mask: np.ndarray | None,
                            size: int | None, classical: tuple[str, ...], probes: int, progress: bool,
                            log: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """dlib against the export's desensitization (and its best classical inpainting, for a mask):
    `(summary for the export's report, the whole audit for the owner log)`."""
    from jaxdesens.privacy import dlib_face
    from jaxdesens.privacy.audit_job import audit_faces

    reason = dlib_face.unavailable_reason()
    if reason is not None:
        log(f"warning: the privacy report has no re-identification audit: {reason}")
        return {"run": False, "note": AUDIT_NOT_RUN}, {"run": False, "reason": reason}
    found, _ = audit_faces(originals, labels, {"export": mask} if method == "mask" else {}, attackers=("dlib",),
                           blur=(size,) if method == "blur" else (), mosaic=(size,) if method == "mosaic" else (),
                           classical=classical if method == "mask" else (), max_probes=probes, progress=progress,
                           log=lambda m: log(f"privacy report: {m}"))
    return public_audit(found["audit"]), {"run": True, **found}


def _audit_md(audit: dict[str, Any]) -> list[str]:
    if not audit.get("run"):
        return ["", f"Re-identification audit: {audit.get('note', 'not run')}."]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = ["", f"Re-identification by {audit['attacker']}. Gallery: {audit['gallery']}, {audit['people']} people; "
             f"{audit['probes']} other photos of them as probes. Chance: rank-1 {pct(audit['rank1_chance'])}, TAR "
             f"{pct(audit['tar_chance'])}. Lower is more private.",
             "", f"| probes | rank-1 | TAR at FAR={audit['far']:g} |", "|---|---|---|"]
    label = {"clean": "clean originals (reference)", "export": "as exported"}
    lines += [f"| {label.get(r['probes'], r['probes'].replace('export+', 'as exported, then ') + ' inpainting')} | "
              f"{pct(r['rank1'])} | {pct(r['tar'])} |" for r in audit["results"]]
    lines += [f"\n**Warning**: {w}." for w in audit["warnings"]]
    return lines
