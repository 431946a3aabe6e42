"""How faithful a saliency template is to what the recognizer uses, measured against occlusion.

A rule that conserves probability and gives non-negative maps is not thereby right; the standard
yardsticks compare a map with the recognizer's measured behaviour:
- the Pearson correlation of the mean saliency map with the mean occlusion map;
- the share of the (positive) occlusion effect that lies inside the template S, against S's area
  (chance keeps an area-sized share);
- the deletion curve (Petsiuk et al., RISE): the mean cross-entropy as the most salient pixels are
  hidden first. The faster it rises, the better the order: its area under the curve (fraction
  hidden from 0 to 1) is compared for EBP, occlusion and random orders.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdesens.models.functional import Folded
from jaxdesens.saliency.occlusion import masked_cross_entropy

DELETION_FRACTIONS = np.linspace(0.0, 1.0, 21)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps (0 where one is constant)."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def effect_share(occlusion_map: np.ndarray, template: np.ndarray) -> float:
    """Share of the positive occlusion effect (CE rises) inside the template's kept pixels."""
    effect = np.maximum(occlusion_map, 0.0)
    total = effect.sum()
    return float((effect * (template > 0)).sum() / total) if total > 0 else 0.0


def border_share(template: np.ndarray, margin: int = 4) -> float:
    """Share of the template's kept pixels that lie within `margin` pixels of the image border."""
    kept = template > 0
    inner = np.zeros_like(kept)
    inner[margin:-margin, margin:-margin] = True
    return float((kept & ~inner).sum() / kept.sum()) if kept.any() else 0.0


def deletion_masks(saliency_map: np.ndarray, fractions: np.ndarray = DELETION_FRACTIONS) -> np.ndarray:
    """Masks `(F, H, W)` hiding the top `f` of pixels by `saliency_map` (ties: lower index first)."""
    order = np.argsort(-saliency_map.ravel(), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    counts = np.round(np.asarray(fractions) * order.size).astype(np.int64)
    return (rank[None, :] >= counts[:, None]).astype(np.float32).reshape(len(counts), *saliency_map.shape)


def deletion_curve(folded: Folded, images: np.ndarray, labels: np.ndarray, saliency_map: np.ndarray,
                   fractions: np.ndarray = DELETION_FRACTIONS) -> np.ndarray:
    """Mean cross-entropy of the images as the most salient pixels are hidden first, one per fraction."""
    x = jnp.asarray(images, jnp.float32)
    x = (x / 255.0 if images.dtype == np.uint8 else x).astype(folded["stem"]["w"].dtype)
    masks = jnp.asarray(deletion_masks(saliency_map, fractions))
    return np.asarray(masked_cross_entropy(folded, x, jnp.asarray(labels, jnp.int32), masks)).mean(axis=1)


def area_under(curve: np.ndarray, fractions: np.ndarray = DELETION_FRACTIONS) -> float:
    return float(np.trapezoid(curve, fractions))


def faithfulness_report(folded: Folded, images: np.ndarray, labels: np.ndarray, ebp_map: np.ndarray,
                        occlusion_map: np.ndarray, template: np.ndarray, *, random_orders: int = 3,
                        seed: int = 0) -> dict[str, Any]:
    """The faithfulness block of a search's `summary.json`: correlation, effect share against area,
    border share, and deletion curves (with their areas) for EBP, occlusion and random orders."""
    rng = np.random.default_rng(seed)
    curves = {"ebp": deletion_curve(folded, images, labels, ebp_map),
              "occlusion": deletion_curve(folded, images, labels, occlusion_map)}
    randoms = [deletion_curve(folded, images, labels, rng.random(ebp_map.shape)) for _ in range(random_orders)]
    curves["random"] = np.mean(randoms, axis=0)
    area = float((template > 0).mean())
    share = effect_share(occlusion_map, template)
    return {
        "images": int(len(images)),
        "ebp_occlusion_correlation": correlation(ebp_map, occlusion_map),
        "template_area": area,
        "occlusion_share_in_template": share,
        "occlusion_share_over_area": share / area if area > 0 else 0.0,
        "template_border_share": border_share(template),
        "deletion_auc": {name: area_under(curve) for name, curve in curves.items()},
        "deletion_auc_random_std": float(np.std([area_under(c) for c in randoms])),
        "deletion_curve": {"fractions": DELETION_FRACTIONS.tolist(),
                           **{name: curve.tolist() for name, curve in curves.items()}},
    }
