"""Excitation Backprop (Zhang et al., IJCV 2018) as `jax.custom_vjp` rules.

EBP passes a top-down "winning probability" P from the target class to lower layers. For an
affine layer `y = W x + b` with non-negative inputs x (they follow a ReLU), the rule is

    P_x = x * W+^T (P_y / Z),    Z = W+ x,    W+ = max(W, 0)    (bias ignored)

so P is conserved layer by layer (up to output units with Z = 0). Choices made here:
- BatchNorm is folded into the preceding convolution (`models/functional.py`). A positive
  per-channel factor cancels between W+ and Z, so this equals "fold the sign of the BN scale
  into the conv and pass BN through", without a special case.
- A residual addition `relu(W2 h + Ws x + b)` is one affine layer over both inputs, so the
  signal splits in proportion to each branch's positive contribution (`W2+ h` versus `Ws+ x`,
  or `x` for an identity shortcut). This keeps conservation exact; splitting by the raw
  (possibly negative) branch values, as some implementations do, does not.
- Average and global pooling use the same rule with their (positive) weights, i.e. a
  proportional split; ReLU and max-pooling keep their ordinary gradients.
Contrastive EBP (the paper's choice) runs a dual pass with negated classifier weights to a
contrast layer, subtracts it there, and propagates the difference to the saliency layer.
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


def _pos(p: dict[str, jax.Array]) -> jax.Array:
    return jnp.maximum(p["w"], 0)


@dataclasses.dataclass(frozen=True)
class Conv:
    stride: int

    def forward(self, x, p):
        return conv(x, p["w"], self.stride) + p["b"]

    def positive(self, x, p):
        return conv(x, _pos(p), self.stride)


def area_halve(x: jax.Array) -> jax.Array:
    """2x2 mean with stride 2 (ceil size, padding excluded): the area a 1x1/2 conv samples from."""
    pad = ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), pad)
    count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add,
                                  (1, 2, 2, 1), (1, 2, 2, 1), pad)
    return total / count


SHORTCUT_RULES = ("area", "exact")


@dataclasses.dataclass(frozen=True)
class Residual:
    """`conv2(h) + shortcut(x)`; the shortcut is a projection conv (`proj`) or the identity.

    `shortcut="exact"` applies the EBP rule to the 1x1 stride-2 projection as it is, which sends
    all of its signal to the even positions it samples; through three down-sampling stages that
    becomes a stride-8 grid of hot spots in early-layer maps (most visible in short-trained
    networks, whose residual branches are still weak). `shortcut="area"` (default) uses the
    2x2 area the position stands for (ResNet-D's average-pool shortcut) as the projection's
    positive model; the forward pass is unchanged and conservation still holds exactly.
    """

    stride: int
    shortcut: str = "area"

    def forward(self, xs, p):
        h, x = xs
        shortcut = conv(x, p["proj"]["w"], self.stride) + p["proj"]["b"] if "proj" in p else x
        return conv(h, p["conv2"]["w"], 1) + p["conv2"]["b"] + shortcut

    def positive(self, xs, p):
        h, x = xs
        if "proj" not in p:
            shortcut = x
        elif self.shortcut == "area" and self.stride == 2 and p["proj"]["w"].shape[0] == 1:
            shortcut = conv(area_halve(x), _pos(p["proj"]), 1)
        else:
            shortcut = conv(x, _pos(p["proj"]), self.stride)
        return conv(h, _pos(p["conv2"]), 1) + shortcut


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


@dataclasses.dataclass(frozen=True)
class ExcitationOps:
    """The `ops` of `functional.forward` with EBP backward rules on every affine layer."""

    shortcut: str = "area"

    @staticmethod
    def conv(x, p, stride):
        return excite(Conv(stride), x, p)

    def residual(self, h, x, p, stride):
        branch = {k: p[k] for k in ("conv2", "proj") if k in p}
        return excite(Residual(stride, self.shortcut), (h, x), branch)

    @staticmethod
    def global_mean(x):
        return excite(GlobalMean(), x, ())

    @staticmethod
    def dense(x, p):
        return excite(Dense(), x, p)


def _channel_map(signal: jax.Array) -> jax.Array:
    return jnp.sum(signal.astype(jnp.float32), axis=-1)


def excitation_signal(folded: Folded, images: jax.Array, targets: jax.Array, *, saliency_layer: str = "layer2",
                      contrast_layer: str = "layer4", contrastive: bool = True,
                      shortcut: str = "area") -> jax.Array:
    """EBP signal summed over channels at `saliency_layer`: `(N, h, w)`, unclamped.

    Plain EBP: the marginal winning probability of the target class. Contrastive: target minus
    the dual (negated classifier) signal, subtracted at `contrast_layer` (which must not be
    below `saliency_layer`).
    """
    for name in (saliency_layer, contrast_layer):
        if name not in BOUNDARIES[1:-1]:
            raise ValueError(f"EBP layers must be one of {BOUNDARIES[1:-1]}, got {name!r}")
    if shortcut not in SHORTCUT_RULES:
        raise ValueError(f"shortcut rule must be one of {SHORTCUT_RULES}, got {shortcut!r}")
    ops = ExcitationOps(shortcut)
    if BOUNDARIES.index(contrast_layer) < BOUNDARIES.index(saliency_layer):
        raise ValueError(f"contrast_layer {contrast_layer!r} is below saliency_layer {saliency_layer!r}")
    activation = forward(folded, images, "input", saliency_layer)
    top = jax.nn.one_hot(targets, folded["head"]["w"].shape[-1], dtype=jnp.float32)

    def upper(head_sign):
        head = {"w": folded["head"]["w"] * head_sign, "b": folded["head"]["b"]}
        return lambda a: forward({**folded, "head": head}, a, contrast_layer, "logits", ops)

    if contrast_layer == saliency_layer:
        lower_pullback, contrast_act = (lambda s: (s,)), activation
    else:
        contrast_act, lower_pullback = jax.vjp(
            lambda a: forward(folded, a, saliency_layer, contrast_layer, ops), activation)
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


@functools.partial(jax.jit, static_argnames=("saliency_layer", "contrast_layer", "contrastive", "shortcut"))
def saliency_maps(folded: Folded, images: jax.Array, targets: jax.Array, *, saliency_layer: str = "layer2",
                  contrast_layer: str = "layer4", contrastive: bool = True, shortcut: str = "area") -> jax.Array:
    """Per-image EBP saliency `(N, H, W)` in [0, 1] for each image's own target class."""
    signal = excitation_signal(folded, images, targets, saliency_layer=saliency_layer,
                               contrast_layer=contrast_layer, contrastive=contrastive, shortcut=shortcut)
    return to_saliency_map(signal, images.shape[1:3])
