"""Feature Selection Masknet (paper Section 3.3, Formula 6).

A stack of `Conv(3x3, stride 2) -> BatchNorm -> ReLU` modules brings the mask down to the
feature map's size, a 1x1 convolution and a sigmoid turn it into per-pixel, per-channel gates,
and feature selection keeps the gate only where the mask hid pixels:

    FS = fsm(m) * (1 - m_resized) + m_resized

`m_resized` is the visible share of each feature cell (area average, padding excluded), so an
all-ones mask gives FS == 1 exactly and the network is exactly the plain backbone.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdesens.models.conv import Conv

FSM_WIDTH = 32


def downsample_mask(mask: jax.Array) -> jax.Array:
    """Halves (ceil) the spatial size by averaging 2x2 cells, ignoring padded cells."""
    return nn.avg_pool(mask, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)


class FeatureSelectionMasknet(nn.Module):
    channels: int
    hidden: int = FSM_WIDTH
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mask: jax.Array, feature_hw: tuple[int, int], train: bool) -> jax.Array:
        """`mask` (N, H, W, 1) in {0, 1} -> feature selection (N, h, w, channels) in [0, 1]."""
        h, resized = mask.astype(self.dtype), mask.astype(jnp.float32)
        module = 0
        while resized.shape[1:3] != tuple(feature_hw):
            if resized.shape[1] < feature_hw[0] or resized.shape[2] < feature_hw[1]:
                raise ValueError(f"mask {mask.shape[1:3]} cannot be halved down to feature size {feature_hw}")
            h = Conv(self.hidden, 3, 2, padding=1, dtype=self.dtype, name=f"conv{module}")(h)
            # Two-pass variance: mask features are near-constant, where E[x^2] - E[x]^2 cancels badly.
            h = nn.BatchNorm(use_running_average=not train, momentum=0.9, use_fast_variance=False, dtype=self.dtype,
                             name=f"bn{module}")(h)
            h = nn.relu(h)
            resized = downsample_mask(resized)
            module += 1
        gates = nn.sigmoid(Conv(self.channels, 1, use_bias=True, dtype=self.dtype, name="gate")(h).astype(jnp.float32))
        return gates * (1.0 - resized) + resized
