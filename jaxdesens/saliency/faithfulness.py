"""How faithful a saliency template is to what the recognizer uses, measured against occlusion.

A rule that conserves probability and gives non-negative maps is not thereby right; the standard
yardsticks compare a map with the recognizer's measured behaviour:
- the Pearson correlation of the mean saliency map with the mean occlusion map;
- the share of the (positive) occlusion effect that lies inside the template S, against S's area
  (chance keeps an area-sized share);
- the deletion and insertion curves (Petsiuk et al., RISE): the mean cross-entropy as the most
  salient pixels are hidden first (deletion: the faster it rises, the better; a larger area under
  the curve) or revealed first from a fully hidden image (insertion: the faster it falls, the
  better; a smaller area). Insertion is the template's own question: which pixels to keep. Each
  is compared for EBP, occlusion and random orders.
The random orders rank smooth random blobs (uniform noise blurred at the occlusion patch's
scale), not single pixels: hiding scattered pixels destroys a face faster than hiding any
contiguous region of the same area (on AT&T pixel-random deletion raised the cross-entropy
faster than occlusion's own order), so a baseline that hides contiguous regions, as the maps do,
is the fair one.
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
                   fractions: np.ndarray = DELETION_FRACTIONS, insertion: bool = False) -> np.ndarray:
    """Mean cross-entropy of the images as the most salient pixels are hidden first (or, with
    `insertion`, revealed first from a fully hidden image), one value per fraction."""
    x = jnp.asarray(images, jnp.float32)
    x = (x / 255.0 if images.dtype == np.uint8 else x).astype(folded["stem"]["w"].dtype)
    masks = deletion_masks(saliency_map, fractions)
    masks = jnp.asarray(1.0 - masks if insertion else masks)
    return np.asarray(masked_cross_entropy(folded, x, jnp.asarray(labels, jnp.int32), masks)).mean(axis=1)


def area_under(curve: np.ndarray, fractions: np.ndarray = DELETION_FRACTIONS) -> float:
    return float(np.trapezoid(curve, fractions))


def random_blob_order(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """A random map whose ranking visits smooth blobs about `scale` pixels wide."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.random(shape), scale, mode="wrap")


def faithfulness_report(folded: Folded, images: np.ndarray, labels: np.ndarray, ebp_map: np.ndarray,
                        occlusion_map: np.ndarray, template: np.ndarray, *, random_orders: int = 5,
                        random_scale: float = 8.0, seed: int = 0) -> dict[str, Any]:
    """The faithfulness block of a search's `summary.json`: correlation, effect share against area,
    border share, and deletion / insertion curves (with their areas) for EBP, occlusion and random
    orders (the random entries are the mean over `random_orders` blob maps, with their std)."""
    rng = np.random.default_rng(seed)
    orders = {"ebp": [ebp_map], "occlusion": [occlusion_map],
              "random": [random_blob_order(ebp_map.shape, random_scale, rng) for _ in range(random_orders)]}
    area = float((template > 0).mean())
    share = effect_share(occlusion_map, template)
    report: dict[str, Any] = {
        "images": int(len(images)),
        "ebp_occlusion_correlation": correlation(ebp_map, occlusion_map),
        "template_area": area,
        "occlusion_share_in_template": share,
        "occlusion_share_over_area": share / area if area > 0 else 0.0,
        "template_border_share": border_share(template),
        "random_scale": random_scale,
    }
    for kind in ("deletion", "insertion"):
        curves = {name: [deletion_curve(folded, images, labels, m, insertion=kind == "insertion") for m in maps]
                  for name, maps in orders.items()}
        report[f"{kind}_auc"] = {name: float(np.mean([area_under(c) for c in cs])) for name, cs in curves.items()}
        report[f"{kind}_auc_random_std"] = float(np.std([area_under(c) for c in curves["random"]]))
        report[f"{kind}_curve"] = {"fractions": DELETION_FRACTIONS.tolist(),
                                   **{name: np.mean(cs, axis=0).tolist() for name, cs in curves.items()}}
    return report


def save_faithfulness_figure(path, ebp_map: np.ndarray, occlusion_map: np.ndarray, template: np.ndarray,
                             report: dict[str, Any], example: np.ndarray | None = None) -> None:
    """The mean EBP map beside the mean occlusion map (the ground truth), the template, and the
    deletion curves: the picture that says whether the template sits where the recognizer looks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mean EBP", ebp_map, "jet"), ("mean occlusion (CE rise)", occlusion_map, "jet"),
              (f"template S ({template.mean():.0%} kept)", template, "gray")]
    if example is not None:
        panels.insert(0, ("example face", example.squeeze(), "gray"))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 2.8))
    for ax, (title, image, cmap) in zip(axes, panels):
        ax.imshow(image, cmap=cmap)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    for kind, style in (("deletion", "-"), ("insertion", "--")):
        curves = report[f"{kind}_curve"]
        for name, colour in (("ebp", "C0"), ("occlusion", "C1"), ("random", "C2")):
            axes[-1].plot(curves["fractions"], curves[name], style, color=colour,
                          label=f"{kind[:3]}. {name} ({report[f'{kind}_auc'][name]:.1f})")
    axes[-1].set_xlabel("share hidden (-) / revealed (--), most salient first", fontsize=7)
    axes[-1].set_ylabel("cross-entropy", fontsize=8)
    axes[-1].set_title(f"r(EBP, occlusion) = {report['ebp_occlusion_correlation']:.2f}", fontsize=8)
    axes[-1].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
