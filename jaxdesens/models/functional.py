"""Inference-only ResNet as a pure function of BatchNorm-folded parameters.

Mask scoring and Excitation Backprop both run a trained, frozen recognizer many times. Folding
every BatchNorm into the convolution before it (`w * s`, `b - mean * s` with
`s = scale / sqrt(var + eps)`) removes a memory pass per layer and gives EBP plain affine
layers to work with. `forward` mirrors `resnet.ResNet` in eval mode exactly (a test holds the two
together); it runs between any two named stage boundaries, which is how EBP splits the network
at its saliency and contrast layers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxdesens.models.conv import conv2d
from jaxdesens.models.pooling import max_pool  # 3x3, stride 2, padding 1: the ResNet stem's pool
from jaxdesens.models.resnet import BN_EPSILON, STAGE_NAMES, STAGE_SIZES

BOUNDARIES = ("input", "stem", *STAGE_NAMES, "logits")

Folded = dict[str, Any]


def _fold(kernel: jax.Array, bn_params: dict, bn_stats: dict) -> dict[str, jax.Array]:
    scale = bn_params["scale"] * lax.rsqrt(bn_stats["var"] + BN_EPSILON)
    return {"w": kernel * scale, "b": bn_params["bias"] - bn_stats["mean"] * scale}


def fold_batchnorm(variables: dict[str, Any], depth: int, dtype: Any = jnp.float32) -> Folded:
    """Flax ResNet variables (no FSM branch) -> folded conv weights and biases in `dtype`."""
    params, stats = variables["params"], variables["batch_stats"]
    if "fsm" in params:
        raise ValueError("fold_batchnorm takes a plain ResNet; an FSM model's clean path is its backbone "
                         "(drop the 'fsm' entries first)")
    folded: Folded = {"stem": _fold(params["stem_conv"]["kernel"], params["stem_bn"], stats["stem_bn"])}
    for block in block_names(depth):
        p, s = params[block], stats[block]
        entry = {"conv1": _fold(p["conv1"]["kernel"], p["bn1"], s["bn1"]),
                 "conv2": _fold(p["conv2"]["kernel"], p["bn2"], s["bn2"])}
        if "proj_conv" in p:
            entry["proj"] = _fold(p["proj_conv"]["kernel"], p["proj_bn"], s["proj_bn"])
        folded[block] = entry
    folded["head"] = {"w": params["head"]["kernel"], "b": params["head"]["bias"]}
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), folded)


def block_names(depth: int) -> list[str]:
    return [f"{STAGE_NAMES[s]}_{b}" for s, n in enumerate(STAGE_SIZES[depth]) for b in range(n)]


def depth_of(folded: Folded) -> int:
    blocks = tuple(sum(1 for k in folded if k.startswith(f"{stage}_")) for stage in STAGE_NAMES)
    return next(d for d, sizes in STAGE_SIZES.items() if sizes == blocks)


def conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """Convolution with PyTorch-style symmetric padding (k // 2), as in `resnet.py`."""
    pad = w.shape[0] // 2
    return conv2d(x, w, stride, ((pad, pad), (pad, pad)))


class PlainOps:
    """Ordinary arithmetic for every affine layer; `ebp.ExcitationOps` swaps in EBP backward rules."""

    @staticmethod
    def conv(x, p, stride):
        return conv(x, p["w"], stride) + p["b"]

    @staticmethod
    def residual(h, x, p, stride):
        shortcut = conv(x, p["proj"]["w"], stride) + p["proj"]["b"] if "proj" in p else x
        return conv(h, p["conv2"]["w"], 1) + p["conv2"]["b"] + shortcut

    @staticmethod
    def global_mean(x):
        return jnp.mean(x, axis=(1, 2))

    @staticmethod
    def dense(x, p):
        return x @ p["w"] + p["b"]


def _block(x, p, stride, ops):
    h = jax.nn.relu(ops.conv(x, p["conv1"], stride))
    return jax.nn.relu(ops.residual(h, x, p, stride))


def forward(folded: Folded, x: jax.Array, start: str = "input", stop: str = "logits", ops=PlainOps) -> jax.Array:
    """Runs the network from boundary `start` to boundary `stop` (see `BOUNDARIES`).

    From `input`, `x` is an NHWC image batch in [0, 1]; otherwise it is the activation at `start`.
    """
    first, last = BOUNDARIES.index(start), BOUNDARIES.index(stop)
    if first >= last:
        raise ValueError(f"stop {stop!r} must come after start {start!r} in {BOUNDARIES}")
    dtype = folded["stem"]["w"].dtype
    x = x.astype(dtype)
    if first == 0:
        x = (x - 0.5) / 0.5
        x = max_pool(jax.nn.relu(ops.conv(x, folded["stem"], 2)))
    depth = depth_of(folded)
    for stage in range(max(first, 1) - 1, min(last, 5) - 1):
        for b in range(STAGE_SIZES[depth][stage]):
            x = _block(x, folded[f"{STAGE_NAMES[stage]}_{b}"], 2 if stage > 0 and b == 0 else 1, ops)
    if last == len(BOUNDARIES) - 1:
        x = ops.dense(ops.global_mean(x.astype(jnp.float32)).astype(dtype), folded["head"]).astype(jnp.float32)
    return x
