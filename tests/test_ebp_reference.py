"""The library's Excitation Backprop against an independent PyTorch reference (`torch_ebp_reference.py`).

The reference rebuilds the project's ResNet in PyTorch (float64, BatchNorm unfolded, projection
shortcuts, max-pool) from the same Flax variables and writes the published EBP rules as autograd
Functions (Caffe ExcitationBP / TorchRay; BatchNorm as the Caffe ResNet demo: the sign of its scale
decides the convolution's excitatory weights, and BN passes the signal through). The library must
give the same per-image, channel-summed, unclamped signal to 1e-4 of each map's largest magnitude,
at every saliency layer, plain and contrastive, on a random ResNet-18 with randomised BatchNorm
(some negative scales; non-zero last scales, so the residual branches carry signal). The template's
mean map (`mean_saliency`) is checked against the reference's maps for each image's own label.

The reference is itself checked without the library: on a network without residual connections it
equals an explicit matrix formulation (NumPy, loops), its element-wise-sum rule is checked on a
hand-worked example, and mutated splits of the residual sum give clearly different maps (so the
comparison is sensitive to that rule). torch is a test dependency: missing, these tests fail.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_ebp_reference as ref
from flax import traverse_util

from jaxdesens.models import ResNet
from jaxdesens.models.functional import fold_batchnorm
from jaxdesens.saliency.ebp import ExcitationOps, excitation_signal
from jaxdesens.saliency.template import mean_saliency

DEPTH, WIDTH, NUM_CLASSES = 18, 0.125, 5
SIZES = {"40x48": (40, 48), "64x64": (64, 64)}  # layer4: 2x2 both; layer3 3x3 vs 4x4
TARGETS = np.array([4, 1, 2])  # images 0 and 1 are the same picture; no target is class 0
LAYER_PAIRS = (("stem", "layer4"), ("layer1", "layer4"), ("layer2", "layer4"), ("layer3", "layer4"),
               ("layer2", "layer3"))
CASES = [(size, s, c, contrastive) for size in SIZES for s, c in LAYER_PAIRS for contrastive in (False, True)]
TOLERANCE = 1e-4  # of each map's max |value|


def random_variables(shapes, seed: int, negative_share: float = 0.2):
    """He-normal kernels; BatchNorm scales of magnitude 0.5..1.5, `negative_share` of them negative;
    random biases, running means and variances."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in traverse_util.flatten_dict(shapes).items():
        shape, leaf = value.shape, key[-1]
        if leaf == "kernel":
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif leaf == "scale":
            value = rng.uniform(0.5, 1.5, shape) * np.where(rng.random(shape) < negative_share, -1.0, 1.0)
        elif leaf in ("bias", "mean"):
            value = rng.normal(scale=0.2, size=shape)
        elif leaf == "var":
            value = rng.uniform(0.5, 2.0, shape)
        out[key] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def network():
    """One random ResNet-18 (the weights fit any image size) and an image batch [A, A, B] per size."""
    model = ResNet(depth=DEPTH, width=WIDTH, num_classes=NUM_CLASSES)
    rng = np.random.default_rng(1)
    images = {}
    for name, hw in SIZES.items():
        pictures = rng.random((2, *hw, 3)).astype(np.float32)
        images[name] = np.concatenate([pictures[:1], pictures])
    variables = random_variables(jax.eval_shape(model.init, jax.random.key(0), images["40x48"][:1]), seed=2)
    return model, variables, images


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The reference's tensors are tiny: on a busy 2-core machine, threads only contend (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_maps(params, images, **rules):
    return {(size, s, c, contrastive): ref.excitation_signal(params, images[size], TARGETS, saliency_layer=s,
                                                            contrast_layer=c, contrastive=contrastive, **rules)
            for size, s, c, contrastive in CASES}


@pytest.fixture(scope="module")
def reference_maps(network):
    _, variables, images = network
    return _reference_maps(ref.convert_flax_variables(variables), images)


@pytest.fixture(scope="module")
def library_maps(network):
    _, variables, images = network
    folded = fold_batchnorm(variables, DEPTH)

    @jax.jit
    def signals(folded, images):
        return {(s, c, contrastive): excitation_signal(folded, images, jnp.asarray(TARGETS), saliency_layer=s,
                                                       contrast_layer=c, contrastive=contrastive)
                for s, c in LAYER_PAIRS for contrastive in (False, True)}

    out = {}
    for size in SIZES:
        for (s, c, contrastive), value in signals(folded, jnp.asarray(images[size])).items():
            out[(size, s, c, contrastive)] = np.asarray(value, np.float64)
    return out


def _mismatch(actual: np.ndarray, expected: np.ndarray) -> list[str]:
    """Per image: the max abs difference relative to the reference map's max abs value, and r."""
    problems = []
    for n, (a, e) in enumerate(zip(actual, expected)):
        scale = np.abs(e).max()
        relative = np.abs(a - e).max() / scale
        if not relative <= TOLERANCE:
            r = np.corrcoef(a.ravel(), e.ravel())[0, 1]
            problems.append(f"image {n}: max|diff| = {relative:.3g} x max|reference| ({scale:.3g}), r = {r:.3f}")
    return problems


def test_reference_forward_equals_flax(network):
    """The weight converter (HWIO -> OIHW, BN statistics, transposed head) and the rebuilt layout, at every
    stage. One size (odd maps from 5x6 down: 40x48 -> 20x24 -> 10x12 -> 5x6 -> 3x3 -> 2x2) keeps it to one
    compile; a layout error at 64x64 would still break the signal comparisons there."""
    model, variables, images = network
    params = ref.convert_flax_variables(variables)
    logits, features = jax.jit(model.apply)(variables, images["40x48"])
    expected = {"logits": logits, **{s: jnp.transpose(features[s], (0, 3, 1, 2)) for s in ref.STAGES}}
    for stop, value in expected.items():
        with torch.no_grad():
            got = ref.run(params, ref.to_nchw(images["40x48"]), "input", stop).numpy()
        value = np.asarray(value)
        assert got.shape == value.shape, stop
        np.testing.assert_allclose(got, value, rtol=1e-4, atol=1e-4 * np.abs(value).max(), err_msg=stop)
    assert np.std(np.asarray(logits)) > 1e-2  # the random network is not degenerate


@pytest.mark.parametrize("size, saliency_layer, contrast_layer, contrastive", CASES,
                         ids=[f"{z}-{s}-{c}-{'contrastive' if k else 'plain'}" for z, s, c, k in CASES])
def test_library_signal_equals_reference(library_maps, reference_maps, size, saliency_layer, contrast_layer,
                                         contrastive):
    key = (size, saliency_layer, contrast_layer, contrastive)
    expected, actual = reference_maps[key], library_maps[key]
    assert actual.shape == expected.shape
    assert np.all(np.abs(expected).max(axis=(1, 2)) > 0)  # every reference map holds signal
    problems = _mismatch(actual, expected)
    assert not problems, f"{key}:\n" + "\n".join(problems)


def test_maps_depend_on_each_images_target(reference_maps):
    """Images 0 and 1 are one picture with two targets, so the per-image label matters in the
    comparison above (a library that ignored or shuffled the targets could not match)."""
    for key, maps in reference_maps.items():
        assert np.abs(maps[0] - maps[1]).max() > 100 * TOLERANCE * np.abs(maps[0]).max(), key


@pytest.mark.parametrize("eltwise", ["positive", "halves"])
def test_mutated_residual_split_changes_the_reference(network, reference_maps, eltwise):
    """Splitting the residual sum by the branches' excitatory contributions (a block as one affine
    layer), or in halves, moves every map by far more than the tolerance."""
    _, variables, images = network
    mutated = _reference_maps(ref.convert_flax_variables(variables), images, eltwise=eltwise)
    for key, maps in mutated.items():
        expected = reference_maps[key]
        spread = max(np.abs(m - e).max() / np.abs(e).max() for m, e in zip(maps, expected))
        assert spread > 100 * TOLERANCE, (eltwise, key, spread)


def _normalised_maps(signal: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Per image: clamp at 0, bilinear upsampling (half-pixel centres) to the image, scale to max 1."""
    upsampled = F.interpolate(torch.as_tensor(np.maximum(signal, 0.0))[:, None], size=hw, mode="bilinear",
                              align_corners=False)[:, 0].numpy()
    peak = upsampled.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, upsampled / np.where(peak > 0, peak, 1.0), 0.0)


def _min_max(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def test_mean_saliency_uses_each_images_label(network, reference_maps):
    """The template's mean map (Formula 4) is the min-max-rescaled sum of each image's normalised
    contrastive map for its own label; all-class-0 or shuffled labels give a visibly different map."""
    _, variables, images = network
    layers = {"saliency_layer": "layer2", "contrast_layer": "layer4", "contrastive": True}
    hw = SIZES["40x48"]
    expected = _min_max(_normalised_maps(reference_maps[("40x48", *layers.values())], hw).sum(0))
    got = mean_saliency(fold_batchnorm(variables, DEPTH), images["40x48"], TARGETS, batch_size=len(TARGETS), **layers)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    params = ref.convert_flax_variables(variables)
    for labels in (np.zeros_like(TARGETS), np.roll(TARGETS, 1)):
        wrong = ref.excitation_signal(params, images["40x48"], labels, **layers)
        assert np.abs(_min_max(_normalised_maps(wrong, hw).sum(0)) - expected).max() > 0.05, labels


def _with_bn_scales(variables, transform):
    flat = traverse_util.flatten_dict(variables)
    return traverse_util.unflatten_dict({k: transform(k, v) if k[-1] == "scale" else v for k, v in flat.items()})


def test_bn_rules_differ_exactly_when_a_scale_is_negative(network):
    """`bn_rule="torchray"` (raw W+) and "sign" (W+ of sign(s) W) agree when all BN scales are positive,
    and part when a single channel's scale turns negative."""
    _, variables, images = network
    positive = _with_bn_scales(variables, lambda _, v: jnp.abs(v))
    one_negative = _with_bn_scales(positive, lambda k, v: v.at[3].multiply(-1.0) if k[1:3] == ("layer2_1", "bn1")
                                   else v)
    args = {"images": images["40x48"], "targets": TARGETS, "saliency_layer": "layer1", "contrast_layer": "layer4",
            "contrastive": True}
    for params, equal in ((ref.convert_flax_variables(positive), True),
                          (ref.convert_flax_variables(one_negative), False)):
        sign = ref.excitation_signal(params, bn_rule="sign", **args)
        torchray = ref.excitation_signal(params, bn_rule="torchray", **args)
        difference = np.abs(sign - torchray).max() / np.abs(sign).max()
        assert (difference < 1e-12) if equal else (difference > 100 * TOLERANCE), (equal, difference)


def test_eltwise_rule_on_a_worked_example():
    """P_a = P a / y, P_b = P b / y with raw (signed) inputs; a position with y = 0 passes nothing."""
    a = torch.tensor([3.0, -1.0, 2.0], dtype=ref.DTYPE, requires_grad=True)
    b = torch.tensor([1.0, 2.0, -2.0], dtype=ref.DTYPE, requires_grad=True)
    p_a, p_b = torch.autograd.grad(ref.EltwiseSum.apply(a, b), (a, b), torch.tensor([1.0, 1.0, 5.0], dtype=ref.DTYPE))
    np.testing.assert_allclose(p_a.numpy(), [0.75, -1.0, 0.0])
    np.testing.assert_allclose(p_b.numpy(), [0.25, 2.0, 0.0])


# ----------------------------------------------------------------------------------------------
# Without residual connections: the reference's rules against explicit matrices (and the library)
# ----------------------------------------------------------------------------------------------


def conv_matrix(in_shape, kernel, stride):
    """Cross-correlation of a (C, H, W) input with an OIHW kernel, zero padding k // 2, as a matrix."""
    cin, h, w = in_shape
    cout, _, k, _ = kernel.shape
    pad = k // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    m = np.zeros((cout, ho, wo, cin, h, w))
    for oy in range(ho):
        for ox in range(wo):
            for ky in range(k):
                for kx in range(k):
                    iy, ix = oy * stride - pad + ky, ox * stride - pad + kx
                    if 0 <= iy < h and 0 <= ix < w:
                        m[:, oy, ox, :, iy, ix] += kernel[:, :, ky, kx]
    return m.reshape(cout * ho * wo, cin * h * w), (cout, ho, wo)


def ebp_affine(matrix, x, p_out):
    """The paper's rule for y = A x + b: P_j = sum_i A+_ij x_j / (sum_k A+_ik x_k) P_i (0 where the sum is 0)."""
    contrib = np.maximum(matrix, 0.0) * x[None, :]
    z = contrib.sum(axis=1)
    return np.divide(contrib, z[:, None], out=np.zeros_like(contrib), where=z[:, None] > 0).T @ p_out


def maxpool_selection(x):
    """3x3 / 2 max-pool with padding 1 on (C, H, W): output values and the 0/1 argmax matrix."""
    c, h, w = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    select = np.zeros((c, ho, wo, c, h, w))
    for ch in range(c):
        for oy in range(ho):
            for ox in range(wo):
                window = [(x[ch, iy, ix], iy, ix) for iy in range(max(0, 2 * oy - 1), min(h, 2 * oy + 2))
                          for ix in range(max(0, 2 * ox - 1), min(w, 2 * ox + 2))]
                _, iy, ix = max(window, key=lambda t: t[0])
                select[ch, oy, ox, ch, iy, ix] = 1.0
    select = select.reshape(c * ho * wo, c * h * w)
    return (select @ x.ravel()).reshape(c, ho, wo), select


def _plain_net(seed=3):
    """conv3x3 (2->3) + BN + ReLU, max-pool, conv3x3/2 (3->4) + BN + ReLU, global mean, dense 4->3.
    One scale of each BN is negative."""
    rng = np.random.default_rng(seed)

    def bn(c):
        scale = rng.uniform(0.5, 1.5, c) * np.where(np.arange(c) == 1, -1.0, 1.0)
        return {"gamma": scale, "beta": rng.normal(scale=0.2, size=c), "mean": rng.normal(scale=0.2, size=c),
                "var": rng.uniform(0.5, 2.0, c)}

    net = {"conv1": rng.normal(size=(3, 2, 3, 3)), "bn1": bn(3), "conv2": rng.normal(size=(4, 3, 3, 3)), "bn2": bn(4),
           "head_w": rng.normal(size=(3, 4)), "head_b": rng.normal(scale=0.2, size=3)}
    x = np.maximum(rng.normal(size=(2, 2, 9, 7)), 0.0)  # rectified, exact zeros included
    top = rng.dirichlet(np.ones(3), size=2)
    return net, x, top


def _folded(kernel, bn):
    """(OIHW kernel, bias) of conv + BN in eval mode."""
    scale = bn["gamma"] / np.sqrt(bn["var"] + ref.BN_EPSILON)
    return kernel * scale[:, None, None, None], bn["beta"] - bn["mean"] * scale


def _torch(a):
    return torch.as_tensor(a, dtype=ref.DTYPE)


def _reference_plain_signal(net, x, top, bn_rule="sign"):
    t = {k: {n: _torch(v) for n, v in val.items()} if isinstance(val, dict) else _torch(val) for k, val in net.items()}
    inputs = _torch(x).requires_grad_(True)
    h = F.relu(ref.conv_bn(inputs, t["conv1"], t["bn1"], 1, bn_rule))
    h = F.max_pool2d(h, 3, 2, 1)
    h = F.relu(ref.conv_bn(h, t["conv2"], t["bn2"], 2, bn_rule))
    out = ref.ExciteLinear.apply(ref.ExciteGlobalMean.apply(h), t["head_w"], t["head_b"], t["head_w"].clamp(min=0))
    return torch.autograd.grad(out, inputs, _torch(top))[0].numpy()


def _matrix_plain_signal(net, x, top):
    """The same network with BN folded into its convolutions, as matrices, one image at a time."""
    w1, b1 = _folded(net["conv1"], net["bn1"])
    w2, b2 = _folded(net["conv2"], net["bn2"])
    signals = []
    for image, p_top in zip(x, top):
        m1, shape1 = conv_matrix(image.shape, w1, 1)
        z1 = m1 @ image.ravel() + np.repeat(b1, shape1[1] * shape1[2])
        a1 = np.maximum(z1, 0.0).reshape(shape1)
        pooled, select = maxpool_selection(a1)
        m2, shape2 = conv_matrix(pooled.shape, w2, 2)
        z2 = m2 @ pooled.ravel() + np.repeat(b2, shape2[1] * shape2[2])
        a2 = np.maximum(z2, 0.0)
        mean = np.kron(np.eye(shape2[0]), np.full((1, shape2[1] * shape2[2]), 1.0 / (shape2[1] * shape2[2])))
        g = mean @ a2
        p = ebp_affine(net["head_w"], g, p_top)
        p = ebp_affine(mean, a2, p) * (z2 > 0)
        p = select.T @ ebp_affine(m2, pooled.ravel(), p) * (z1 > 0)
        signals.append(ebp_affine(m1, image.ravel(), p).reshape(image.shape))
    return np.stack(signals)


def test_reference_equals_matrix_formulation_without_residuals():
    """The sign rule on the unfolded net equals the plain rule on BN-folded matrices; "torchray" does not
    (each BN has a negative scale)."""
    net, x, top = _plain_net()
    expected = _matrix_plain_signal(net, x, top)
    assert np.abs(expected).max() > 0 and np.all(expected >= 0)
    np.testing.assert_allclose(_reference_plain_signal(net, x, top), expected, rtol=1e-10, atol=1e-12)
    torchray = _reference_plain_signal(net, x, top, bn_rule="torchray")
    assert np.abs(torchray - expected).max() > 1e-3 * np.abs(expected).max()


def test_library_rules_without_residuals_equal_reference():
    """The library's conv / global-mean / dense rules (`ExcitationOps`) on the BN-folded plain net."""
    net, x, top = _plain_net()
    ops = ExcitationOps()

    def params(kernel, bn):
        w, b = _folded(kernel, bn)
        return {"w": jnp.asarray(w.transpose(2, 3, 1, 0), jnp.float32), "b": jnp.asarray(b, jnp.float32)}

    p1, p2 = params(net["conv1"], net["bn1"]), params(net["conv2"], net["bn2"])
    head = {"w": jnp.asarray(net["head_w"].T, jnp.float32), "b": jnp.asarray(net["head_b"], jnp.float32)}

    def run(images):
        h = nn.max_pool(jax.nn.relu(ops.conv(images, p1, 1)), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        return ops.dense(ops.global_mean(jax.nn.relu(ops.conv(h, p2, 2))), head)

    @jax.jit
    def pulled_back(images, top):
        return jax.vjp(run, images)[1](top)[0]

    signal = np.asarray(pulled_back(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32), jnp.asarray(top, jnp.float32)))
    signal = signal.transpose(0, 3, 1, 2)
    expected = _reference_plain_signal(net, x, top)
    np.testing.assert_allclose(signal, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
