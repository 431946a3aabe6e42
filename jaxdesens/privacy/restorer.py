"""The learned restoration attacker: a gated-convolution U-Net (the DeepFill v2 family).

Input: the masked image (hidden pixels 0) and its mask (1 = visible); output: a full image whose
visible pixels are then replaced by the known ones (`composite`), so the attacker only ever
changes what was hidden. Gated convolution (Yu et al., ICCV 2019) learns a soft per-pixel,
per-channel gate next to each feature, which lets the network tell hole from valid pixels at
every depth; partial convolution's hard mask update is the fixed special case.

Layout (side S, a multiple of 8; width w): gated 3x3 convs with w/2 channels at S, w at S/2,
2w at S/4 and 4w at S/8 (stride 2 down), two dilated gated convs at S/8 (dilation 2 and 4: the
receptive field spans the face), then three nearest-upsampling stages with skip connections back
to w/2 channels and a 3x3 output convolution (sigmoid). Channels are fewest where the map is
largest: on a CPU the full-resolution stages dominate the cost.
No normalisation layers: statistics of a half-hidden image mislead BatchNorm (DeepFill v2 has none).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class GatedConv(nn.Module):
    """`elu(conv_f(x)) * sigmoid(conv_g(x))`, both halves from one convolution."""

    features: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Conv(2 * self.features, (self.kernel, self.kernel), strides=self.stride,
                    kernel_dilation=self.dilation, padding="SAME", dtype=self.dtype)(x)
        feature, gate = jnp.split(y, 2, axis=-1)
        return nn.elu(feature) * nn.sigmoid(gate)


def _upsample(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class RestorerNet(nn.Module):
    """Predicts the whole image from `(masked image, mask)`; see `composite` for the output used."""

    width: int = 16
    channels: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, mask: jax.Array) -> jax.Array:
        if images.shape[1] % 8 or images.shape[2] % 8:
            raise ValueError(f"the restorer needs image sides that are multiples of 8, got {images.shape[1:3]}")
        w, dt = self.width, self.dtype
        x = jnp.concatenate([images * mask * 2.0 - mask, mask], axis=-1)  # hidden pixels 0, visible in [-1, 1]
        e1 = GatedConv(max(1, w // 2), dtype=dt)(x)
        e2 = GatedConv(w, stride=2, dtype=dt)(e1)
        e3 = GatedConv(2 * w, stride=2, dtype=dt)(e2)
        b = GatedConv(4 * w, stride=2, dtype=dt)(e3)
        b = GatedConv(4 * w, dilation=2, dtype=dt)(b)
        b = GatedConv(4 * w, dilation=4, dtype=dt)(b)
        d3 = GatedConv(2 * w, dtype=dt)(jnp.concatenate([_upsample(b), e3], axis=-1))
        d2 = GatedConv(w, dtype=dt)(jnp.concatenate([_upsample(d3), e2], axis=-1))
        d1 = GatedConv(max(1, w // 2), dtype=dt)(jnp.concatenate([_upsample(d2), e1], axis=-1))
        out = nn.Conv(self.channels, (3, 3), padding="SAME", dtype=dt)(d1)
        return nn.sigmoid(out.astype(jnp.float32))


def composite(images: jax.Array, mask: jax.Array, predicted: jax.Array) -> jax.Array:
    """Known pixels where visible, the prediction where hidden: `x * m + p * (1 - m)`."""
    return images * mask + predicted * (1.0 - mask)
