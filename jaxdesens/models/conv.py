"""2-D convolution (NHWC x HWIO) shared by the Flax modules and the functional network.

The CPU policy (all measured on ResNet-18, 64 px, batch 64, 2 cores; figures in the README):
* XLA:CPU compiles a convolution whose input or output map is smaller than its kernel into a
  naive loop: a 3x3 convolution on the 2x2 maps of layer4 at 64 px takes 2.5 s instead of 35 ms,
  and the input gradient of layer4's first convolution (3x3, stride 2, 4 -> 2 px) 0.6-0.9 s
  instead of 45-65 ms. There, and only on the CPU, the convolution is computed as shifted slices
  times a matrix (im2col), which is exact and differentiable; everywhere else it is
  `lax.conv_general_dilated`. (im2col everywhere is not faster.)
* Convolutions stay off YNNPACK, which would run most of them on one core: an XLA flag that
  must be set before JAX starts, so it lives in `jaxdesens/xla_flags.py` and is applied at
  `import jaxdesens`.
* The stem's max-pool has a hand-written gradient (`pooling.py`).

A strided convolution on few input channels (the 7x7 stride-2 stem on RGB) can instead run as
a stride-1 convolution on a space-to-depth view of its input (the same linear map with the
kernel rearranged, as MLPerf ResNets do on TPUs). If the 3 channels are padded to 8 for tensor
cores, that trades a 392-long padded reduction for a 256-long one. It is off unless
`JAXDESENS_SPACE_TO_DEPTH=1` is set before the process starts: on the CPU it is 2.6x slower
(measured), and on GPUs it awaits a measurement (`benchmarks/gpu_suite.sh` runs both).
"""

from __future__ import annotations

import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DIMENSIONS = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]
SPACE_TO_DEPTH = os.environ.get("JAXDESENS_SPACE_TO_DEPTH", "0") == "1"
SPACE_TO_DEPTH_MAX_CHANNELS = 4


def _by_matmul(x: jax.Array, w: jax.Array, stride: int, padding: Padding) -> jax.Array:
    kh, kw, cin, cout = w.shape
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    columns = [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
               for i in range(kh) for j in range(kw)]
    patches = columns[0] if len(columns) == 1 else jnp.concatenate(columns, axis=-1)
    return patches @ w.reshape(kh * kw * cin, cout)


def _by_space_to_depth(x: jax.Array, w: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """`stride`-strided convolution as a stride-1 one on `stride x stride` blocks of the input.

    With the kernel zero-padded to `s * q` taps, `out[i] = sum_{q, r} x[s (i + q) + r] w[s q + r]`:
    a convolution over block index `q` whose channels are (r, t, c).
    """
    kh, kw, cin, cout = w.shape
    s = stride
    (top, bottom), (left, right) = padding
    out_h = (x.shape[1] + top + bottom - kh) // s + 1
    out_w = (x.shape[2] + left + right - kw) // s + 1
    qh, qw = math.ceil(kh / s), math.ceil(kw / s)
    rows, cols = s * (out_h + qh - 1), s * (out_w + qw - 1)
    x = jnp.pad(x, ((0, 0), (top, max(0, rows - x.shape[1] - top)), (left, max(0, cols - x.shape[2] - left)), (0, 0)))
    x = x[:, :rows, :cols]
    n = x.shape[0]
    x = x.reshape(n, rows // s, s, cols // s, s, cin).transpose(0, 1, 3, 2, 4, 5).reshape(n, rows // s, cols // s, -1)
    w = jnp.pad(w, ((0, s * qh - kh), (0, s * qw - kw), (0, 0), (0, 0)))
    w = w.reshape(qh, s, qw, s, cin, cout).transpose(0, 2, 1, 3, 4, 5).reshape(qh, qw, s * s * cin, cout)
    return lax.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=DIMENSIONS)


def map_smaller_than_kernel(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: int,
                            padding: Padding) -> bool:
    """Whether the input or the output map of the convolution is smaller than its kernel."""
    (top, bottom), (left, right) = padding
    out_h = (x_shape[1] + top + bottom - w_shape[0]) // stride + 1
    out_w = (x_shape[2] + left + right - w_shape[1]) // stride + 1
    return min(x_shape[1], out_h) < w_shape[0] or min(x_shape[2], out_w) < w_shape[1]


def conv2d(x: jax.Array, w: jax.Array, stride: int, padding: Padding) -> jax.Array:
    if jax.default_backend() == "cpu" and map_smaller_than_kernel(x.shape, w.shape, stride, padding):
        return _by_matmul(x, w, stride, padding)
    if SPACE_TO_DEPTH and stride > 1 and w.shape[2] <= SPACE_TO_DEPTH_MAX_CHANNELS:
        return _by_space_to_depth(x, w, stride, padding)
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
