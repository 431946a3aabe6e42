"""The critical template S (paper Formula 4): mean EBP saliency over K images, thresholded at T.

Aligned faces put the regions a recognizer relies on (eyes, brows, nose) in the same place, so
one template serves the whole set. S is 1 where the mean map exceeds T: those pixels stay
visible in every candidate mask.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxdesens.models.functional import Folded
from jaxdesens.saliency.ebp import saliency_maps


def mean_saliency(folded: Folded, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 64,
                  saliency_layer: str = "layer2", contrast_layer: str = "layer4",
                  contrastive: bool = True) -> np.ndarray:
    """Mean of the per-image normalised EBP maps, min-max rescaled to [0, 1], `(H, W)`.

    Each face peaks somewhere slightly different, so the raw mean of K max-normalised maps tops
    out well below 1 (about 0.4 on AT&T) and a fixed T = 0.5 would keep nothing. Rescaling makes
    T a fraction of the mean map's dynamic range, so T = 0.3..0.7 all give usable templates, as
    in the paper's Fig. 10.
    """
    total = np.zeros(images.shape[1:3], np.float64)
    for start in range(0, len(images), batch_size):
        x = jnp.asarray(images[start:start + batch_size], jnp.float32)
        x = x / 255.0 if images.dtype == np.uint8 else x
        maps = saliency_maps(folded, x, jnp.asarray(labels[start:start + batch_size]),
                             saliency_layer=saliency_layer, contrast_layer=contrast_layer, contrastive=contrastive)
        total += np.asarray(maps, np.float64).sum(0)
    return rescale01(total)


def rescale01(mean_map: np.ndarray) -> np.ndarray:
    """Min-max rescaling to [0, 1] (all zeros for a constant map), so T is a fraction of the range."""
    low, high = mean_map.min(), mean_map.max()
    return ((mean_map - low) / (high - low) if high > low else np.zeros_like(mean_map)).astype(np.float32)


def threshold_template(mean_map: np.ndarray, T: float) -> np.ndarray:
    """S = 1 where the mean saliency exceeds T (Formula 4), as a float32 {0, 1} mask."""
    if not 0.0 <= T <= 1.0:
        raise ValueError(f"--T must lie in [0, 1] (the mean map is normalised to max 1), got {T}")
    return (mean_map > T).astype(np.float32)


def save_template_figure(path: Path, mean_map: np.ndarray, thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7),
                         example: np.ndarray | None = None) -> None:
    """The mean map and S at several T side by side (the paper's Fig. 10, first row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(thresholds) + (example is not None)
    fig, axes = plt.subplots(1, panels, figsize=(2.2 * panels, 2.6))
    column = 0
    if example is not None:
        axes[0].imshow(example.squeeze(), cmap="gray" if example.shape[-1] == 1 else None)
        axes[0].set_title("example face")
        column = 1
    axes[column].imshow(mean_map, cmap="jet", vmin=0, vmax=1)
    axes[column].set_title("mean saliency")
    for ax, t in zip(axes[column + 1:], thresholds):
        s = threshold_template(mean_map, t)
        ax.imshow(s, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"S, T={t} ({s.mean():.0%} kept)")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
