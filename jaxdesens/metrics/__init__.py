"""Evaluation metrics. Host-side restoration attacks live in `jaxdesens.metrics.attacks`
(imported on demand: they need OpenCV and scikit-image)."""

from jaxdesens.metrics.quality import dssim, psnr, ssim
from jaxdesens.metrics.verification import (
    Pairs,
    combine_flip,
    cosine_scores,
    generate_pairs,
    kfold_accuracy,
    roc_auc,
    tar_at_far,
    verification_report,
)

__all__ = ["Pairs", "combine_flip", "cosine_scores", "dssim", "generate_pairs", "kfold_accuracy", "psnr", "roc_auc",
           "ssim", "tar_at_far", "verification_report"]
