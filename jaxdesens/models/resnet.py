"""ResNet-18/34 (basic blocks) in Flax Linen, returning logits and named stage features.

Layout follows torchvision (7x7/2 stem, 3x3/2 max-pool, PyTorch-style explicit padding), so
shapes, FLOPs and parameter counts match the PyTorch peer used in the benchmarks. The Feature
Selection Masknet (`fsm.py`) gates the output of one stage when `fsm_after` is set.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdesens.models.conv import Conv
from jaxdesens.models.fsm import FeatureSelectionMasknet

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def stage_width(stage: int, width: float) -> int:
    """Channels of stage `stage` (0-based) for a width multiplier (1.0 = the standard 64..512)."""
    return max(1, int(round(64 * width))) * 2 ** stage


class BasicBlock(nn.Module):
    filters: int
    strides: int
    dtype: Any
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(Conv, dtype=self.dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                                 epsilon=BN_EPSILON, dtype=self.dtype)
        y = conv(self.filters, 3, self.strides, padding=1, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(self.filters, 3, padding=1, name="conv2")(y)
        # Optionally zero-initialised last scale: every block starts as the identity (Goyal et al.).
        # Off by default (as torchvision): short trainings then leave the residual branches weak, and
        # Excitation Backprop routes through the stride-2 projections, giving grid-like saliency.
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = norm(scale_init=scale_init, name="bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.filters:
            x = conv(self.filters, 1, self.strides, name="proj_conv")(x)
            x = norm(name="proj_bn")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """`__call__(images, mask=None, train=False) -> (logits, features)`.

    `images` are NHWC in [0, 1] (already multiplied by their mask when desensitized); `mask` is
    `(N, H, W, 1)` or `(H, W)`, 1 = visible, and is only read by the FSM branch. `features` holds
    `layer1`..`layer4` (after the FSM gate where one is inserted) and `embedding` (the pooled
    feature used for verification).
    """

    depth: int = 34
    num_classes: int = 1000
    width: float = 1.0
    dtype: Any = jnp.float32
    fsm_after: int | None = None
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, mask: jax.Array | None = None,
                 train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}")
        if self.fsm_after is not None and self.fsm_after not in (1, 2, 3, 4):
            raise ValueError(f"fsm_after must be 1..4 or None, got {self.fsm_after}")
        x = (images.astype(self.dtype) - 0.5) / 0.5
        x = Conv(stage_width(0, self.width), 7, 2, padding=3, dtype=self.dtype, name="stem_conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                         dtype=self.dtype, name="stem_bn")(x)
        x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        features = {}
        for stage, blocks in enumerate(STAGE_SIZES[self.depth]):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(stage_width(stage, self.width), strides, self.dtype, self.zero_init_residual,
                               name=f"{STAGE_NAMES[stage]}_{block}")(x, train)
            if self.fsm_after == stage + 1 and mask is not None:
                gate = FeatureSelectionMasknet(x.shape[-1], dtype=self.dtype, name="fsm")(
                    broadcast_mask(mask, images.shape), x.shape[1:3], train)
                x = x * gate.astype(x.dtype)
            features[STAGE_NAMES[stage]] = x
        embedding = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features["embedding"] = embedding
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(embedding.astype(self.dtype))
        return logits.astype(jnp.float32), features


def broadcast_mask(mask: jax.Array, image_shape: Sequence[int]) -> jax.Array:
    """(H, W), (H, W, 1), (N, H, W) or (N, H, W, 1) -> (N, H, W, 1) or (1, H, W, 1) float32.

    One mask shared by the whole batch stays a batch of one: the FSM branch then runs once and
    its gate broadcasts over the batch. That is exact, BatchNorm included: a batch of identical
    masks has the same statistics as one of them.
    """
    mask = jnp.asarray(mask, jnp.float32)
    if mask.ndim == 2:
        mask = mask[None, :, :, None]
    elif mask.ndim == 3:
        mask = mask[..., None] if mask.shape[0] == image_shape[0] and mask.shape[-1] != 1 else mask[None]
    if mask.shape[0] not in (1, image_shape[0]) or mask.shape[1:3] != tuple(image_shape[1:3]):
        raise ValueError(f"mask of shape {mask.shape} does not fit images of shape {tuple(image_shape)}")
    return mask
