"""Desensitization operators (mask, Gaussian blur, mosaic) compared in the paper."""

from jaxdesens.desensitize.operators import (
    METHODS,
    apply_mask,
    desensitize,
    gaussian_blur,
    gaussian_kernel,
    mosaic,
    paper_sizes,
)

__all__ = ["METHODS", "apply_mask", "desensitize", "gaussian_blur", "gaussian_kernel", "mosaic", "paper_sizes"]
