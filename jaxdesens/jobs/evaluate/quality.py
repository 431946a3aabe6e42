"""The privacy tables: Table 4 (mask vs blur vs mosaic: dSSIM, PSNR and accuracy) and the
restoration attacks on the searched mask (inpainting, then PSNR/SSIM and accuracy)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxdesens.jobs.evaluate.sets import EvalSet, attack_subset
from jaxdesens.jobs.evaluate.tables import Embedder, Model, brief, pair_report, to_uint8
from jaxdesens.masks.ops import apply_mask, mask_ratio
from jaxdesens.metrics.attacks import restoration_report
from jaxdesens.metrics.quality import dssim, psnr

_QUALITY_BATCH = 256


def _chunked_desensitize(images: np.ndarray, operator: Callable[[jax.Array], jax.Array],
                         batch: int = _QUALITY_BATCH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Desensitized uint8 images and per-image dSSIM and PSNR against the originals.

    Chunks of a fixed size (the last padded) so each operator compiles once."""

    n = len(images)
    batch = min(batch, n)
    out = np.empty_like(images)
    dssim_v, psnr_v = np.empty(n), np.empty(n)
    for start in range(0, n, batch):
        chunk = images[start:start + batch]
        valid = len(chunk)
        if valid < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - valid, axis=0)])
        x = chunk.astype(np.float32) / 255.0
        y = operator(x)
        dssim_v[start:start + valid] = np.asarray(dssim(x, y))[:valid]
        psnr_v[start:start + valid] = np.asarray(psnr(x, y))[:valid]
        out[start:start + valid] = to_uint8(np.asarray(y))[:valid]
    return out, dssim_v, psnr_v


def desensitization_methods(mask: np.ndarray, image_size: int) -> list[dict[str, Any]]:
    from jaxdesens.desensitize import paper_sizes

    sizes = paper_sizes(image_size)
    methods = [{"method": "mask", "size": None, "label": f"mask (ratio {mask_ratio(mask):.1%})"}]
    methods += [{"method": "blur", "size": k, "label": f"blur k={k}"} for k in sizes["blur"]]
    methods += [{"method": "mosaic", "size": b, "label": f"mosaic b={b}"} for b in sizes["mosaic"]]
    return methods


def table4_methods(models: Sequence[Model], evalset: EvalSet, embed: Embedder, mask: np.ndarray,
                   masked: dict[str, np.ndarray], progress: bool = False) -> dict[str, Any]:
    """Table 4: dSSIM and PSNR of each desensitization against the original, and every model's
    accuracy on test images desensitized that way (both images)."""
    from tqdm.auto import tqdm

    from jaxdesens.desensitize import desensitize

    rows = []
    methods = desensitization_methods(mask, evalset.images.shape[1])
    for spec in tqdm(methods, disable=not progress, desc="Table 4 methods", unit="method"):
        operator = (functools.partial(desensitize, method="mask", mask=mask) if spec["method"] == "mask"
                    else functools.partial(desensitize, method=spec["method"], size=spec["size"]))
        images, dssim_v, psnr_v = _chunked_desensitize(evalset.images, operator)
        row = {**spec, "dssim_mean": float(dssim_v.mean()), "dssim_std": float(dssim_v.std()),
               "psnr_mean": float(psnr_v.mean()), "psnr_std": float(psnr_v.std()), "models": {}}
        for model in models:
            # The mask row is Situation 1: an FSM model gets the mask; blur and mosaic leave no hidden pixels.
            emb = masked[model.label] if spec["method"] == "mask" else embed(model, images)
            row["models"][model.label] = brief(pair_report(emb, emb, evalset.pairs))
        rows.append(row)
    return {"rows": rows, "ordering": dssim_ordering(rows)}


def dssim_ordering(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Does dSSIM(mask) > dSSIM(mosaic) > dSSIM(blur) hold, for the weak and for the strong sizes?"""
    value = {r["method"]: [] for r in rows}
    for r in rows:
        value[r["method"]].append(r["dssim_mean"])
    mask = value["mask"][0]
    result = {}
    for i, strength in enumerate(("weak", "strong")):
        mosaic, blur = value["mosaic"][i], value["blur"][i]
        result[strength] = {"mask": mask, "mosaic": mosaic, "blur": blur,
                            "mask_gt_mosaic": bool(mask > mosaic), "mosaic_gt_blur": bool(mosaic > blur),
                            "holds": bool(mask > mosaic > blur)}
    result["holds"] = all(result[s]["holds"] for s in ("weak", "strong"))
    return result


def restoration_attacks(models: Sequence[Model], evalset: EvalSet, embed: Embedder, mask: np.ndarray,
                        clean: dict[str, np.ndarray], masked: dict[str, np.ndarray], methods: Sequence[str],
                        cap: int, seed: int, progress: bool = False) -> dict[str, Any]:
    """Inpainting attacks on the searched mask: PSNR/SSIM of restored vs original next to the
    masked-vs-original baseline, and every model's accuracy on restored images (both images)."""
    indices, pairs = attack_subset(evalset.pairs, len(evalset.images), cap, seed)
    originals = evalset.images[indices].astype(np.float32) / 255.0
    masked_images = apply_mask(originals, mask)
    report = restoration_report(originals, masked_images, mask, tuple(methods), progress=progress)
    rows = [{"name": "clean (no desensitization)", "method": None, "psnr_mean": None, "ssim_mean": None,
             "models": {m.label: brief(pair_report(clean[m.label][indices], clean[m.label][indices], pairs))
                        for m in models}},
            {"name": "masked (no restoration)", "method": "masked", **report["baseline"],
             "models": {m.label: brief(pair_report(masked[m.label][indices], masked[m.label][indices], pairs))
                        for m in models}}]
    for method in methods:
        stats = dict(report["methods"][method])
        restored = stats.pop("restored")
        row = {"name": method, "method": method, **stats, "models": {}}
        for model in models:
            emb = embed(model, restored)
            row["models"][model.label] = brief(pair_report(emb, emb, pairs))
        rows.append(row)
    return {"images": int(len(indices)), "pairs": int(len(pairs)),
            "all_images": bool(len(indices) == len(evalset.images)), "methods": list(methods), "rows": rows}

