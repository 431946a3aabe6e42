"""An independent PyTorch reference for Excitation Backprop on the project's ResNet.

Written from the published rules (Zhang et al., IJCV 2018; Caffe ExcitationBP and its ResNet demo;
TorchRay's `excitation_backprop`), sharing no code with `jaxdesens.saliency` or
`jaxdesens.models.functional`: the network is rebuilt here in PyTorch (float64) from the Flax
variables, with every BatchNorm kept as its own layer (running statistics, eval mode).

Backward rules, each a `torch.autograd.Function`:
- conv / linear `y = W x + b`: `P_x = x * W+^T (P_y / (W+ x))`, bias ignored; an output whose
  denominator is zero passes nothing.
- BatchNorm passes P through unchanged. Its scale `s = gamma / sqrt(var + eps)` decides which
  weights of the convolution before it are excitatory: with `bn_rule="sign"` (the Caffe ResNet
  demo, which folds the sign of the scale into the convolution) output channel o uses
  `(sign(s_o) W_o)+`; with `bn_rule="torchray"` it uses the raw `W+` (TorchRay).
- global average pooling: the same rule with its positive weights 1 / (h w).
- element-wise sum `y = a + b` of a residual block: `P_a = P_y a / y`, `P_b = P_y b / y` with the raw,
  possibly negative inputs (Caffe `eltwise`, TorchRay `_patch_eltwise_sum`); nothing where y == 0.
  `eltwise="positive"` (split by each branch's excitatory contribution, which makes the block one
  affine layer over both inputs) and `eltwise="halves"` are deliberate mutations for the tests.
- ReLU and max-pooling: ordinary gradients.
Contrastive EBP subtracts the dual signal (classifier weights negated) from the target signal at the
contrast layer's output and propagates the difference down with the same rules.

Boundaries follow the project: "stem" is the output of the stem's max-pool, "layerK" the output of
stage K (after the last block's ReLU), "logits" the dense head on the global mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

BOUNDARIES = ("input", "stem", "layer1", "layer2", "layer3", "layer4", "logits")
STAGES = BOUNDARIES[2:6]
BN_EPSILON = 1e-5
BN_RULES = ("sign", "torchray")
ELTWISE_RULES = ("raw", "positive", "halves")
DTYPE = torch.float64

Params = dict[str, Any]


def _tensor(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, np.float64), dtype=DTYPE)


def _batch_norm(bn_params: Mapping, bn_stats: Mapping) -> dict[str, torch.Tensor]:
    return {"gamma": _tensor(bn_params["scale"]), "beta": _tensor(bn_params["bias"]),
            "mean": _tensor(bn_stats["mean"]), "var": _tensor(bn_stats["var"])}


def _kernel(flax_kernel) -> torch.Tensor:
    """Flax HWIO -> PyTorch OIHW."""
    return _tensor(flax_kernel).permute(3, 2, 0, 1).contiguous()


def convert_flax_variables(variables: Mapping) -> Params:
    """Flax `ResNet` variables (params + batch_stats, no FSM) -> float64 PyTorch tensors."""
    params, stats = variables["params"], variables["batch_stats"]
    out: Params = {"stem": {"conv": _kernel(params["stem_conv"]["kernel"]),
                            "bn": _batch_norm(params["stem_bn"], stats["stem_bn"])}}
    for name in params:
        if name.split("_")[0] in STAGES:
            p, s = params[name], stats[name]
            block = {"conv1": _kernel(p["conv1"]["kernel"]), "bn1": _batch_norm(p["bn1"], s["bn1"]),
                     "conv2": _kernel(p["conv2"]["kernel"]), "bn2": _batch_norm(p["bn2"], s["bn2"])}
            if "proj_conv" in p:
                block["proj_conv"] = _kernel(p["proj_conv"]["kernel"])
                block["proj_bn"] = _batch_norm(p["proj_bn"], s["proj_bn"])
            out[name] = block
    out["head"] = {"weight": _tensor(params["head"]["kernel"]).T.contiguous(), "bias": _tensor(params["head"]["bias"])}
    return out


def bn_scale(bn: Mapping) -> torch.Tensor:
    return bn["gamma"] / torch.sqrt(bn["var"] + BN_EPSILON)


def excitatory_weights(kernel: torch.Tensor, bn: Mapping, bn_rule: str) -> torch.Tensor:
    """The non-negative weights EBP uses for a conv followed by BatchNorm `bn`."""
    if bn_rule == "sign":
        kernel = kernel * torch.sign(bn_scale(bn)).reshape(-1, 1, 1, 1)
    elif bn_rule != "torchray":
        raise ValueError(f"bn_rule must be one of {BN_RULES}, got {bn_rule!r}")
    return kernel.clamp(min=0)


def _share(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """p / z, and 0 where z == 0 (that unit passes nothing)."""
    nonzero = z != 0
    return torch.where(nonzero, p / torch.where(nonzero, z, torch.ones_like(z)), torch.zeros_like(p))


class ExciteConv(torch.autograd.Function):
    """conv2d without bias; backward `x * W+^T (P / (W+ x))` with the given excitatory weights."""

    @staticmethod
    def forward(ctx, x, kernel, excitatory, stride, padding):
        ctx.save_for_backward(x, excitatory)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, kernel, None, stride, padding)

    @staticmethod
    def backward(ctx, p_out):
        x, excitatory = ctx.saved_tensors
        z = F.conv2d(x, excitatory, None, ctx.stride, ctx.padding)
        back = torch.nn.grad.conv2d_input(x.shape, excitatory, _share(p_out, z), ctx.stride, ctx.padding)
        return x * back, None, None, None, None


class PassThroughBatchNorm(torch.autograd.Function):
    """Eval-mode BatchNorm whose backward hands P on unchanged."""

    @staticmethod
    def forward(ctx, x, gamma, beta, mean, var):
        return F.batch_norm(x, mean, var, gamma, beta, training=False, eps=BN_EPSILON)

    @staticmethod
    def backward(ctx, p_out):
        return p_out, None, None, None, None


class EltwiseSum(torch.autograd.Function):
    """`a + b`; backward splits P by the raw inputs: `P a / y`, `P b / y`."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx, p_out):
        a, b = ctx.saved_tensors
        share = _share(p_out, a + b)
        return a * share, b * share


class WeightedSum(torch.autograd.Function):
    """`a + b`; backward splits P in the ratio `weight_a : weight_b` (the mutations' splits)."""

    @staticmethod
    def forward(ctx, a, b, weight_a, weight_b):
        ctx.save_for_backward(weight_a, weight_b)
        return a + b

    @staticmethod
    def backward(ctx, p_out):
        weight_a, weight_b = ctx.saved_tensors
        share = _share(p_out, weight_a + weight_b)
        return weight_a * share, weight_b * share, None, None


class ExciteGlobalMean(torch.autograd.Function):
    """Mean over (H, W); backward: the average-pooling rule, i.e. P split in proportion to x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, p_out):
        (x,) = ctx.saved_tensors
        positive_weight = 1.0 / (x.shape[2] * x.shape[3])
        return x * positive_weight * _share(p_out, x.mean(dim=(2, 3)))[:, :, None, None]


class ExciteLinear(torch.autograd.Function):
    """`x W^T + b`; backward `x * (P / (x W+^T)) W+` (bias ignored)."""

    @staticmethod
    def forward(ctx, x, weight, bias, excitatory):
        ctx.save_for_backward(x, excitatory)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, p_out):
        x, excitatory = ctx.saved_tensors
        return x * (_share(p_out, x @ excitatory.T) @ excitatory), None, None, None


def conv_bn(x: torch.Tensor, kernel: torch.Tensor, bn: Mapping, stride: int, bn_rule: str) -> torch.Tensor:
    """Convolution (padding k // 2) then BatchNorm, as two layers with their own backward rules."""
    y = ExciteConv.apply(x, kernel, excitatory_weights(kernel, bn, bn_rule), stride, kernel.shape[-1] // 2)
    return PassThroughBatchNorm.apply(y, bn["gamma"], bn["beta"], bn["mean"], bn["var"])


def _excitatory_contribution(x: torch.Tensor, kernel: torch.Tensor, bn: Mapping, stride: int) -> torch.Tensor:
    """`(s W)+ x` with s the BN scale: what one branch adds to the denominator of a block treated as
    a single affine layer over both inputs (the "positive" mutation)."""
    folded = (kernel * bn_scale(bn).reshape(-1, 1, 1, 1)).clamp(min=0)
    return F.conv2d(x, folded, None, stride, kernel.shape[-1] // 2)


def residual_sum(a, b, h, x, block: Mapping, stride: int, eltwise: str) -> torch.Tensor:
    if eltwise == "raw":
        return EltwiseSum.apply(a, b)
    with torch.no_grad():
        if eltwise == "positive":
            weight_a = _excitatory_contribution(h, block["conv2"], block["bn2"], 1)
            weight_b = (_excitatory_contribution(x, block["proj_conv"], block["proj_bn"], stride)
                        if "proj_conv" in block else x)
        elif eltwise == "halves":
            weight_a = weight_b = torch.ones_like(a)
        else:
            raise ValueError(f"eltwise must be one of {ELTWISE_RULES}, got {eltwise!r}")
    return WeightedSum.apply(a, b, weight_a, weight_b)


def basic_block(x: torch.Tensor, block: Mapping, stride: int, bn_rule: str, eltwise: str) -> torch.Tensor:
    h = F.relu(conv_bn(x, block["conv1"], block["bn1"], stride, bn_rule))
    a = conv_bn(h, block["conv2"], block["bn2"], 1, bn_rule)
    b = conv_bn(x, block["proj_conv"], block["proj_bn"], stride, bn_rule) if "proj_conv" in block else x
    return F.relu(residual_sum(a, b, h, x, block, stride, eltwise))


def _blocks(params: Params, stage: str) -> list[str]:
    return sorted((k for k in params if k.split("_")[0] == stage), key=lambda k: int(k.split("_")[1]))


def run(params: Params, x: torch.Tensor, start: str = "input", stop: str = "logits", *, bn_rule: str = "sign",
        eltwise: str = "raw", head_sign: float = 1.0) -> torch.Tensor:
    """The network from boundary `start` to `stop` (NCHW float64; from "input", images in [0, 1]).

    `head_sign=-1` negates the classifier (the dual network of contrastive EBP)."""
    first, last = BOUNDARIES.index(start), BOUNDARIES.index(stop)
    if first >= last:
        raise ValueError(f"stop {stop!r} must come after start {start!r}")
    if first == 0:
        x = (x - 0.5) / 0.5
        x = F.relu(conv_bn(x, params["stem"]["conv"], params["stem"]["bn"], 2, bn_rule))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for stage in STAGES[max(first, 1) - 1:min(last, 5) - 1]:
        for i, name in enumerate(_blocks(params, stage)):
            x = basic_block(x, params[name], 2 if stage != "layer1" and i == 0 else 1, bn_rule, eltwise)
    if stop == "logits":
        weight = params["head"]["weight"] * head_sign
        x = ExciteLinear.apply(ExciteGlobalMean.apply(x), weight, params["head"]["bias"], weight.clamp(min=0))
    return x


def to_nchw(images) -> torch.Tensor:
    return _tensor(images).permute(0, 3, 1, 2)


def excitation_signal(params: Params, images, targets, *, saliency_layer: str, contrast_layer: str,
                      contrastive: bool, bn_rule: str = "sign", eltwise: str = "raw") -> np.ndarray:
    """`(N, h, w)` float64: the EBP signal at `saliency_layer` summed over channels, unclamped."""
    if not 0 < BOUNDARIES.index(saliency_layer) <= BOUNDARIES.index(contrast_layer) < len(BOUNDARIES) - 1:
        raise ValueError(f"need stem <= saliency_layer <= contrast_layer <= layer4, "
                         f"got {saliency_layer!r}, {contrast_layer!r}")
    rules = {"bn_rule": bn_rule, "eltwise": eltwise}
    with torch.no_grad():
        activation = run(params, to_nchw(images), "input", saliency_layer, **rules)
    activation.requires_grad_(True)
    contrast = run(params, activation, saliency_layer, contrast_layer, **rules) \
        if contrast_layer != saliency_layer else activation
    top_input = contrast.detach().requires_grad_(True)
    top = F.one_hot(torch.as_tensor(np.asarray(targets), dtype=torch.long),
                    params["head"]["weight"].shape[0]).to(DTYPE)

    def signal_at_contrast(head_sign: float) -> torch.Tensor:
        logits = run(params, top_input, contrast_layer, "logits", head_sign=head_sign, **rules)
        return torch.autograd.grad(logits, top_input, top)[0]

    signal = signal_at_contrast(1.0)
    if contrastive:
        signal = signal - signal_at_contrast(-1.0)
    if contrast is not activation:
        signal = torch.autograd.grad(contrast, activation, signal)[0]
    return signal.sum(dim=1).detach().numpy()
