"""The export's privacy report: mask ratio, dSSIM/PSNR against the originals, inpainting attacks."""

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
    lines += ["", "Learned inpainters (the paper uses RFR-Net) may restore more than these training-free ones.", ""]
    return "\n".join(lines)
