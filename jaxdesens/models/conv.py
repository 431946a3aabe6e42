"""2-D convolution (NHWC x HWIO) shared by the Flax modules and the functional network.

XLA:CPU takes a pathologically slow path when a feature map is smaller than the kernel (a 3x3
convolution on the 2x2 or 1x1 maps that layer3/layer4 reach at 32-64 px): 540 ms instead of 7 ms
for a 512-channel layer on 64 images. There, and only on the CPU, the convolution is computed as
shifted slices times a matrix (im2col), which is exact and differentiable; everywhere else it is
`lax.conv_general_dilated`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DIMENSIONS = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]


def _by_matmul(x: jax.Array, w: jax.Array, stride: int, padding: Padding) -> jax.Array:
    kh, kw, cin, cout = w.shape
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    columns = [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
               for i in range(kh) for j in range(kw)]
    patches = columns[0] if len(columns) == 1 else jnp.concatenate(columns, axis=-1)
    return patches @ w.reshape(kh * kw * cin, cout)


def conv2d(x: jax.Array, w: jax.Array, stride: int, padding: Padding) -> jax.Array:
    if jax.default_backend() == "cpu" and (x.shape[1] < w.shape[0] or x.shape[2] < w.shape[1]):
        return _by_matmul(x, w, stride, padding)
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DIMENSIONS)


class Conv(nn.Module):
    """A square-kernel convolution with explicit symmetric padding, like `nn.Conv` (same
    parameter names and initialisers) but computed by `conv2d`."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = False
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (self.kernel, self.kernel, x.shape[-1], self.features),
                            jnp.float32)
        pad = (self.padding, self.padding)
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, (pad, pad))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32).astype(self.dtype)
        return y
