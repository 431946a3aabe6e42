"""Excitation Backprop (Zhang et al., IJCV 2018) as `jax.custom_vjp` rules, as published.

EBP passes a top-down "winning probability" P from the target class to lower layers. The rules
follow the reference implementations (Caffe ExcitationBP, TorchRay):
- An affine layer `y = W x + b` with non-negative inputs x (they follow a ReLU) passes

      P_x = x * W+^T (P_y / Z),    Z = W+ x,    W+ = max(W, 0)    (bias ignored; Z = 0 passes nothing)

  so P is conserved layer by layer. Average and global pooling use the same rule with their
  (positive) weights; ReLU and max-pooling keep their ordinary gradients (winner takes all).
- A residual addition `y = a + b` (a = the branch's last BatchNorm output, b = the identity or the
  projection's BatchNorm output) splits P in proportion to each input's raw value,
  `P_a = P_y * a / y` (Caffe `eltwise`, TorchRay `eltwise_sum`); each input then follows its own
  rules, so a 1x1 stride-2 projection sends its share only to the positions it reads.
- BatchNorm is folded into the convolution before it (`models/functional.py`). A positive
  per-channel factor cancels between W+ and Z, so this is exactly the Caffe ResNet demo's choice:
  the sign of each BatchNorm scale is folded into its convolution (a channel with a negative scale
  is excited by the negative weights) and BatchNorm passes P through. (TorchRay passes BatchNorm
  through without the sign; the two agree wherever every scale is positive.)
Contrastive EBP (the paper's choice) runs a dual pass with negated classifier weights to a
contrast layer, subtracts it there, and propagates the difference to the saliency layer.
`tests/test_ebp_reference.py` holds these rules equal to a PyTorch implementation of them on
the unfolded network.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxdesens.models.functional import BOUNDARIES, Folded, conv, forward


def _safe_ratio(g: jax.Array, z: jax.Array) -> jax.Array:
    ok = z > 0
    return jnp.where(ok, g.astype(jnp.float32) / jnp.where(ok, z.astype(jnp.float32), 1.0), 0.0).astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def excite(layer, xs: Any, params: Any) -> jax.Array:
    """`layer.forward(xs, params)` whose VJP w.r.t. `xs` is the EBP rule built on `layer.positive`."""
    return layer.forward(xs, params)


def _excite_fwd(layer, xs, params):
    return layer.forward(xs, params), (xs, params)


def _excite_bwd(layer, residuals, g):
    xs, params = residuals
    z, pullback = jax.vjp(lambda inputs: layer.positive(inputs, params), xs)
    (ct,) = pullback(_safe_ratio(g, z))
    return jax.tree.map(jnp.multiply, xs, ct), jax.tree.map(jnp.zeros_like, params)


excite.defvjp(_excite_fwd, _excite_bwd)


@jax.custom_vjp
def eltwise_sum(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a + b` whose VJP splits the signal by the raw inputs: `P_a = P_y a / y` (y = 0 passes nothing)."""
    return a + b


def _eltwise_fwd(a, b):
    return a + b, (a, b)


def _eltwise_bwd(residuals, g):
    a, b = residuals
    y = a + b
    ok = y != 0
    share = jnp.where(ok, g / jnp.where(ok, y, 1.0), 0.0)
    return share * a, share * b


eltwise_sum.defvjp(_eltwise_fwd, _eltwise_bwd)


def _pos(p: dict[str, jax.Array]) -> jax.Array:
    return jnp.maximum(p["w"], 0)


@dataclasses.dataclass(frozen=True)
class Conv:
    stride: int

    def forward(self, x, p):
        return conv(x, p["w"], self.stride) + p["b"]

    def positive(self, x, p):
        return conv(x, _pos(p), self.stride)


@dataclasses.dataclass(frozen=True)
class Dense:
    def forward(self, x, p):
        return x @ p["w"] + p["b"]

    def positive(self, x, p):
        return x @ _pos(p)


@dataclasses.dataclass(frozen=True)
class GlobalMean:
    def forward(self, x, _):
        return jnp.mean(x, axis=(1, 2))

    positive = forward


@dataclasses.dataclass(frozen=True)
class AvgPool:
    """`window x window` average pooling with stride `window` (no padding)."""

    window: int

    def forward(self, x, _):
        w = self.window
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, w, w, 1), (1, w, w, 1), "VALID") / (w * w)

    positive = forward


class ExcitationOps:
    """The `ops` of `functional.forward` with EBP backward rules on every affine layer and sum."""

    @staticmethod
    def conv(x, p, stride):
        return excite(Conv(stride), x, p)

    @staticmethod
    def residual(h, x, p, stride):
        branch = excite(Conv(1), h, p["conv2"])
        shortcut = excite(Conv(stride), x, p["proj"]) if "proj" in p else x
        return eltwise_sum(branch, shortcut)

    @staticmethod
    def global_mean(x):
        return excite(GlobalMean(), x, ())

    @staticmethod
    def dense(x, p):
        return excite(Dense(), x, p)


def _channel_map(signal: jax.Array) -> jax.Array:
    return jnp.sum(signal.astype(jnp.float32), axis=-1)


def excitation_signal(folded: Folded, images: jax.Array, targets: jax.Array, *, saliency_layer: str = "layer2",
                      contrast_layer: str = "layer4", contrastive: bool = True) -> jax.Array:
    """EBP signal summed over channels at `saliency_layer`: `(N, h, w)`, unclamped.

    Plain EBP: the marginal winning probability of the target class. Contrastive: target minus
    the dual (negated classifier) signal, subtracted at `contrast_layer` (which must not be
    below `saliency_layer`).
    """
    for name in (saliency_layer, contrast_layer):
        if name not in BOUNDARIES[1:-1]:
            raise ValueError(f"EBP layers must be one of {BOUNDARIES[1:-1]}, got {name!r}")
    if BOUNDARIES.index(contrast_layer) < BOUNDARIES.index(saliency_layer):
        raise ValueError(f"contrast_layer {contrast_layer!r} is below saliency_layer {saliency_layer!r}")
    activation = forward(folded, images, "input", saliency_layer)
    top = jax.nn.one_hot(targets, folded["head"]["w"].shape[-1], dtype=jnp.float32)

    def upper(head_sign):
        head = {"w": folded["head"]["w"] * head_sign, "b": folded["head"]["b"]}
        return lambda a: forward({**folded, "head": head}, a, contrast_layer, "logits", ExcitationOps)

    if contrast_layer == saliency_layer:
        lower_pullback, contrast_act = (lambda s: (s,)), activation
    else:
        contrast_act, lower_pullback = jax.vjp(
            lambda a: forward(folded, a, saliency_layer, contrast_layer, ExcitationOps), activation)
    _, pullback = jax.vjp(upper(1.0), contrast_act)
    (signal,) = pullback(top)
    if contrastive:
        _, dual_pullback = jax.vjp(upper(-1.0), contrast_act)
        signal = signal - dual_pullback(top)[0]
    (signal,) = lower_pullback(signal)
    return _channel_map(signal)


def to_saliency_map(signal: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Clamps at zero, resizes bilinearly to the image and scales each map to max 1."""
    maps = jnp.maximum(signal, 0.0)
    maps = jax.image.resize(maps, (maps.shape[0], *size), "bilinear")
    maps = jnp.maximum(maps, 0.0)
    peak = jnp.max(maps, axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, maps / jnp.where(peak > 0, peak, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("saliency_layer", "contrast_layer", "contrastive"))
def saliency_maps(folded: Folded, images: jax.Array, targets: jax.Array, *, saliency_layer: str = "layer2",
                  contrast_layer: str = "layer4", contrastive: bool = True) -> jax.Array:
    """Per-image EBP saliency `(N, H, W)` in [0, 1] for each image's own target class."""
    signal = excitation_signal(folded, images, targets, saliency_layer=saliency_layer,
                               contrast_layer=contrast_layer, contrastive=contrastive)
    return to_saliency_map(signal, images.shape[1:3])
