"""Excitation Backprop: the library's `custom_vjp` rules against an independent NumPy reference.

The reference follows the paper's definition (Zhang et al., "Top-down Neural Attention by
Excitation Backprop"): for an affine layer with non-negative inputs a_j and weights w_ij, the
top-down winning probability of input unit j is

    P_j = sum_i  w+_ij a_j / (sum_k w+_ik a_k) * P_i        (zero denominator: unit i passes nothing)

Every layer of the reference is an explicit dense matrix on its flattened (H, W, C) input, built
with loops, so it shares no code with `jaxdesens.saliency.ebp` or `lax.conv`. A residual sum
`y = a + b` (a = conv2(h), b = x or proj(x)) splits P by the raw inputs, `P_a = P_y a / y`, as
Caffe's eltwise layer and TorchRay do. ReLU and max-pooling use their ordinary gradients
(max-pool: all signal to the window's argmax). `test_ebp_reference.py` compares whole ResNets
with a PyTorch implementation on the unfolded network.

The tiny networks below are built from the library's `excite` and layer specs; a zero "probe"
added to the input of every layer makes one `jax.vjp` return the signal at each layer. The
ResNet tests use a random ResNet-18 (width 0.125) with randomised BatchNorm (some negative
scales, so the folded weights flip sign), on non-square 40x48 images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax import lax

from jaxdesens.models import ResNet, functional
from jaxdesens.models.functional import fold_batchnorm, forward
from jaxdesens.saliency.ebp import (
    AvgPool,
    Conv,
    Dense,
    ExcitationOps,
    GlobalMean,
    excitation_signal,
    excite,
    saliency_maps,
    to_saliency_map,
)

RTOL = 1e-4
ATOL = 1e-6  # guards exact zeros and the raw residual split's cancellations against float32 dust
BATCH = 2

# ----------------------------------------------------------------------------------------------
# NumPy reference (float64, one image at a time)
# ----------------------------------------------------------------------------------------------


def ebp_affine(a_matrix: np.ndarray, a: np.ndarray, p_out: np.ndarray) -> np.ndarray:
    """The paper's rule for `y = A a + b`: P_j = sum_i A+_ij a_j / (sum_k A+_ik a_k) P_i."""
    contrib = np.maximum(a_matrix, 0.0) * a[None, :]  # w+_ij a_j
    z = contrib.sum(axis=1)
    share = np.divide(contrib, z[:, None], out=np.zeros_like(contrib), where=z[:, None] > 0)
    return share.T @ p_out


def conv_matrix(in_shape, kernel, stride):
    """Cross-correlation with symmetric zero padding k // 2 as a (n_out, n_in) matrix."""
    h, w, cin = in_shape
    k, _, _, cout = kernel.shape
    pad = k // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    m = np.zeros((ho, wo, cout, h, w, cin))
    for oy in range(ho):
        for ox in range(wo):
            for ky in range(k):
                for kx in range(k):
                    iy, ix = oy * stride - pad + ky, ox * stride - pad + kx
                    if 0 <= iy < h and 0 <= ix < w:
                        m[oy, ox, :, iy, ix, :] += kernel[ky, kx].T
    return m.reshape(ho * wo * cout, h * w * cin), (ho, wo, cout)


def avgpool_matrix(in_shape, window):
    """`window x window` average pooling, stride `window`, no padding (the remainder is dropped)."""
    h, w, c = in_shape
    ho, wo = h // window, w // window
    m = np.zeros((ho, wo, c, h, w, c))
    for oy in range(ho):
        for ox in range(wo):
            for dy in range(window):
                for dx in range(window):
                    for ch in range(c):
                        m[oy, ox, ch, oy * window + dy, ox * window + dx, ch] = 1.0 / window**2
    return m.reshape(ho * wo * c, h * w * c), (ho, wo, c)


def mean_matrix(in_shape):
    h, w, c = in_shape
    m = np.zeros((c, h, w, c))
    for ch in range(c):
        m[ch, :, :, ch] = 1.0 / (h * w)
    return m.reshape(c, h * w * c)


def maxpool_ref(x):
    """3x3 max-pool, stride 2, padding 1 (padding never wins): values and argmax positions."""
    h, w, c = x.shape
    ho, wo = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    out, arg = np.zeros((ho, wo, c)), np.zeros((ho, wo, c, 2), int)
    for oy in range(ho):
        for ox in range(wo):
            for ch in range(c):
                best = None
                for iy in range(max(0, 2 * oy - 1), min(h, 2 * oy + 2)):
                    for ix in range(max(0, 2 * ox - 1), min(w, 2 * ox + 2)):
                        if best is None or x[iy, ix, ch] > best:
                            best, arg[oy, ox, ch] = x[iy, ix, ch], (iy, ix)
                out[oy, ox, ch] = best
    return out, arg


def _f64(p):
    return {k: np.asarray(v, np.float64) for k, v in p.items()}


def _ref_forward(layer, x):
    kind = layer[0]
    if kind == "conv":
        p = _f64(layer[1])
        m, shape = conv_matrix(x.shape, p["w"], layer[2])
        return (m @ x.ravel() + np.tile(p["b"], shape[0] * shape[1])).reshape(shape), m
    if kind == "relu":
        return np.maximum(x, 0.0), None
    if kind == "avgpool":
        m, shape = avgpool_matrix(x.shape, layer[1])
        return (m @ x.ravel()).reshape(shape), m
    if kind == "maxpool":
        return maxpool_ref(x)
    if kind == "flatten":
        return x.ravel(), None
    if kind == "dense":
        p = _f64(layer[1])
        return x @ p["w"] + p["b"], p["w"].T
    if kind == "gmean":
        m = mean_matrix(x.shape)
        return m @ x.ravel(), m
    if kind == "block":  # returns conv2(relu(conv1(x))) + shortcut(x), before the final ReLU
        params, stride = layer[1], layer[2]
        c1, c2 = _f64(params["conv1"]), _f64(params["conv2"])
        m1, hshape = conv_matrix(x.shape, c1["w"], stride)
        z1 = m1 @ x.ravel() + np.tile(c1["b"], hshape[0] * hshape[1])
        h = np.maximum(z1, 0.0)
        m2, yshape = conv_matrix(hshape, c2["w"], 1)
        a = m2 @ h + np.tile(c2["b"], yshape[0] * yshape[1])
        if "proj" in params:
            pr = _f64(params["proj"])
            ms, _ = conv_matrix(x.shape, pr["w"], stride)
            b = ms @ x.ravel() + np.tile(pr["b"], yshape[0] * yshape[1])
        else:
            ms, b = None, x.ravel()
        return (a + b).reshape(yshape), (m1, z1, h, m2, ms, a, b)
    raise AssertionError(kind)


def _ref_backward(layer, x, cache, p_out):
    kind = layer[0]
    if kind in ("conv", "avgpool", "dense", "gmean"):
        return ebp_affine(cache, x.ravel(), p_out.ravel()).reshape(x.shape)
    if kind == "relu":  # ordinary gradient
        return p_out * (x > 0)
    if kind == "maxpool":  # ordinary gradient: everything to the argmax
        arg = cache
        p_in = np.zeros_like(x)
        for (oy, ox, ch), value in np.ndenumerate(p_out):
            iy, ix = arg[oy, ox, ch]
            p_in[iy, ix, ch] += value
        return p_in
    if kind == "flatten":
        return p_out.reshape(x.shape)
    if kind == "block":  # the sum splits by raw inputs; each input follows its own rule; conv1 path to x
        m1, z1, h, m2, ms, a, b = cache
        y = a + b
        share = np.divide(p_out.ravel(), y, out=np.zeros_like(y), where=y != 0)
        p_h = ebp_affine(m2, h, share * a)
        p_x_shortcut = share * b if ms is None else ebp_affine(ms, x.ravel(), share * b)
        p_z1 = p_h * (z1 > 0)
        return (p_x_shortcut + ebp_affine(m1, x.ravel(), p_z1)).reshape(x.shape)
    raise AssertionError(kind)


def reference(layers, x, top):
    """Forward then EBP backward for one image: (output, [signal at the input of each layer], [inputs])."""
    x = np.asarray(x, np.float64)
    inputs, caches = [], []
    for layer in layers:
        inputs.append(x)
        x, cache = _ref_forward(layer, x)
        caches.append(cache)
    p = np.asarray(top, np.float64)
    signals = [None] * len(layers)
    for i in reversed(range(len(layers))):
        p = _ref_backward(layers[i], inputs[i], caches[i], p)
        signals[i] = p
    return x, signals, inputs


# ----------------------------------------------------------------------------------------------
# The same networks from the library's `excite` and layer specs
# ----------------------------------------------------------------------------------------------


def _max_pool(x):
    """`functional.max_pool` (3x3, stride 2, padding 1) with a Python-scalar init value, which keeps
    it reverse-differentiable under `jit` (see `test_functional_max_pool_grad_under_jit`)."""
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


def test_max_pool_stand_in_is_functional_max_pool():
    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_max_pool(x)), np.asarray(functional.max_pool(jnp.asarray(x))))


def test_functional_max_pool_grad_under_jit():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 6, 2)).astype(np.float32))
    grad = jax.jit(jax.grad(lambda v: functional.max_pool(v).sum()))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(jax.grad(lambda v: _max_pool(v).sum())(x)))


def _lib_layer(layer, x):
    kind = layer[0]
    params = jax.tree.map(jnp.asarray, layer[1]) if len(layer) > 1 and isinstance(layer[1], dict) else None
    if kind == "conv":
        return excite(Conv(layer[2]), x, params)
    if kind == "relu":
        return jax.nn.relu(x)
    if kind == "avgpool":
        return excite(AvgPool(layer[1]), x, ())
    if kind == "maxpool":
        return _max_pool(x)
    if kind == "flatten":
        return x.reshape(x.shape[0], -1)
    if kind == "dense":
        return excite(Dense(), x, params)
    if kind == "gmean":
        return excite(GlobalMean(), x, ())
    if kind == "block":  # as `functional._block`, without its final ReLU (a separate layer here)
        h = jax.nn.relu(excite(Conv(layer[2]), x, params["conv1"]))
        return ExcitationOps.residual(h, x, params, layer[2])
    raise AssertionError(kind)


def library_net(layers):
    def run(x, probes):
        for layer, probe in zip(layers, probes):
            x = _lib_layer(layer, x + probe)
        return x

    return run


def library_signals(layers, x, top):
    """(output, signal at the input x, [signal at the input of each layer]) via one `jax.vjp`."""
    run = library_net(layers)
    shapes = []

    def record(x):
        for layer in layers:
            shapes.append(x.shape)
            x = _lib_layer(layer, x)
        return x

    jax.eval_shape(record, jnp.asarray(x))

    @jax.jit
    def go(x, top):
        probes = [jnp.zeros(s, jnp.float32) for s in shapes]
        out, pullback = jax.vjp(run, x, probes)
        p_x, p_probes = pullback(top)
        return out, p_x, p_probes

    out, p_x, p_probes = go(jnp.asarray(x), jnp.asarray(top))
    return np.asarray(out), np.asarray(p_x), [np.asarray(p) for p in p_probes]


# ----------------------------------------------------------------------------------------------
# Tiny random networks (negative weights, random biases) on rectified random inputs
# ----------------------------------------------------------------------------------------------


def _conv(rng, k, cin, cout, bias):
    w = rng.normal(size=(k, k, cin, cout)) * 1.5 / np.sqrt(k * k * cin)
    b = rng.normal(scale=0.3, size=cout) if bias else np.zeros(cout)
    return {"w": w.astype(np.float32), "b": b.astype(np.float32)}


def _dense(rng, d, c, bias):
    w = rng.normal(size=(d, c)) * 1.5 / np.sqrt(d)
    b = rng.normal(scale=0.3, size=c) if bias else np.zeros(c)
    return {"w": w.astype(np.float32), "b": b.astype(np.float32)}


def _block(rng, cin, cout, stride, bias):
    p = {"conv1": _conv(rng, 3, cin, cout, bias), "conv2": _conv(rng, 3, cout, cout, bias)}
    if stride != 1 or cin != cout:
        p["proj"] = _conv(rng, 1, cin, cout, bias)
    return p


NETS = {
    # name: (input shape of one image, builder(rng, bias) -> layers)
    "dense": ((6,), lambda r, b: [("dense", _dense(r, 6, 5, b)), ("relu",), ("dense", _dense(r, 5, 4, b))]),
    "conv3_s1_dense": ((5, 5, 2), lambda r, b: [("conv", _conv(r, 3, 2, 3, b), 1), ("relu",), ("flatten",),
                                                ("dense", _dense(r, 75, 4, b))]),
    "conv3_s2_dense": ((7, 6, 2), lambda r, b: [("conv", _conv(r, 3, 2, 3, b), 2), ("relu",), ("flatten",),
                                                ("dense", _dense(r, 4 * 3 * 3, 4, b))]),
    "conv5_s2_dense": ((6, 7, 2), lambda r, b: [("conv", _conv(r, 5, 2, 3, b), 2), ("relu",), ("flatten",),
                                                ("dense", _dense(r, 3 * 4 * 3, 4, b))]),
    "conv_avgpool_dense": ((5, 5, 2), lambda r, b: [("conv", _conv(r, 3, 2, 3, b), 1), ("relu",), ("avgpool", 2),
                                                    ("flatten",), ("dense", _dense(r, 2 * 2 * 3, 4, b))]),
    "conv_maxpool_dense": ((6, 5, 2), lambda r, b: [("conv", _conv(r, 3, 2, 3, b), 1), ("relu",), ("maxpool",),
                                                    ("flatten",), ("dense", _dense(r, 3 * 3 * 3, 4, b))]),
    "residual_identity": ((8, 8, 2), lambda r, b: [("conv", _conv(r, 3, 2, 3, b), 2), ("relu",),
                                                   ("block", _block(r, 3, 3, 1, b), 1), ("relu",), ("gmean",),
                                                   ("dense", _dense(r, 3, 4, b))]),
    "residual_projection": ((6, 6, 2), lambda r, b: [("conv", _conv(r, 3, 2, 3, b), 1), ("relu",),
                                                     ("block", _block(r, 3, 4, 2, b), 2), ("relu",), ("gmean",),
                                                     ("dense", _dense(r, 4, 4, b))]),
    "two_blocks_avgpool": ((8, 7, 2), lambda r, b: [("conv", _conv(r, 3, 2, 3, b), 1), ("relu",),
                                                    ("block", _block(r, 3, 3, 1, b), 1), ("relu",),
                                                    ("block", _block(r, 3, 4, 2, b), 2), ("relu",), ("avgpool", 2),
                                                    ("gmean",), ("dense", _dense(r, 4, 3, b))]),
}


def make_case(name, bias, seed=0):
    rng = np.random.default_rng([seed, list(NETS).index(name), int(bias)])
    shape, build = NETS[name]
    layers = build(rng, bias)
    x = np.maximum(rng.normal(size=(BATCH, *shape)), 0.0).astype(np.float32)  # rectified: exact zeros too
    n_out = layers[-1][1]["w"].shape[-1]
    top = rng.dirichlet(np.ones(n_out), size=BATCH).astype(np.float32)  # a probability per image
    return layers, x, top


@pytest.fixture(scope="module", params=list(NETS))
def net_case(request):
    """Library and reference results for one net with biases, computed once per module."""
    layers, x, top = make_case(request.param, bias=True)
    lib = library_signals(layers, x, top)
    refs = [reference(layers, x[n], top[n]) for n in range(BATCH)]
    return request.param, layers, x, top, lib, refs


def test_forward_matches_reference(net_case):
    _, _, _, _, (out, _, _), refs = net_case
    np.testing.assert_allclose(out, np.stack([r[0] for r in refs]), rtol=1e-5, atol=1e-5)


def test_signals_match_reference_at_every_layer(net_case):
    name, layers, _, _, (_, p_x, p_layers), refs = net_case
    np.testing.assert_allclose(p_x, np.stack([r[1][0] for r in refs]), rtol=RTOL, atol=ATOL, err_msg=name)
    for i, layer in enumerate(layers):
        expected = np.stack([r[1][i] for r in refs])
        np.testing.assert_allclose(p_layers[i], expected, rtol=RTOL, atol=ATOL,
                                   err_msg=f"{name}: input of layer {i} ({layer[0]})")
    assert np.abs(p_x).max() > 0, "trivial case: no signal reached the input"


def test_plain_signals_are_non_negative_without_residual_sums(net_case):
    """Only a residual sum's raw split (`P_a = P_y a / y`, a < 0 possible) can make a signal negative."""
    name, layers, _, _, (_, p_x, p_layers), _ = net_case
    if any(layer[0] == "block" for layer in layers):
        return
    for p in (p_x, *p_layers):
        assert np.all(p >= 0), p.min()


@pytest.mark.parametrize("name", [name for name in NETS if not name.startswith(("residual", "two_blocks"))])
def test_bias_free_nets_conserve_the_signal(name):
    """Every layer's signal sums to 1 when no unit holding signal has Z = sum_k w+_ik a_k = 0.

    Without biases z <= Z, so a unit behind a ReLU that holds signal (z > 0) has Z > 0; only the
    output layer (no ReLU) can drop mass, so the top signal is put on outputs with Z > 0 only.
    (A residual sum's raw split can hand a negative share to a branch whose Z is 0, which then
    passes nothing: the published rule does not conserve exactly there.)
    """
    layers, x, top = make_case(name, bias=False)
    for n in range(BATCH):
        penultimate = reference(layers, x[n], top[n])[2][-1]
        z_top = penultimate @ np.maximum(np.asarray(layers[-1][1]["w"], np.float64), 0.0)
        assert np.any(z_top > 0)
        top[n] = np.where(z_top > 0, top[n], 0.0) / np.where(z_top > 0, top[n], 0.0).sum()
    _, p_x, p_layers = library_signals(layers, x, top)
    for i, p in enumerate([p_x, *p_layers]):
        np.testing.assert_allclose(p.reshape(BATCH, -1).sum(1), 1.0, atol=1e-5, err_msg=f"{name}: signal {i}")
    refs = [reference(layers, x[n], top[n]) for n in range(BATCH)]
    np.testing.assert_allclose(p_x, np.stack([r[1][0] for r in refs]), rtol=RTOL, atol=ATOL)


def test_zero_denominator_units_pass_nothing():
    """A unit whose positive-weight inputs are all zero (Z = 0) but that fires through its bias."""
    layers = [("dense", {"w": np.array([[1.0, -1.0], [-2.0, 1.0]], np.float32), "b": np.array([7.0, 0.0], np.float32)})]
    x = np.array([[0.0, 3.0]], np.float32)  # output 0: z = -6 + 7 = 1 > 0 but Z = 1 * 0 = 0; output 1: Z = 3
    top = np.array([[0.25, 0.75]], np.float32)
    _, p_x, _ = library_signals(layers, x, top)
    np.testing.assert_allclose(p_x, [[0.0, 0.75]])
    np.testing.assert_allclose(p_x[0], reference(layers, x[0], top[0])[1][0], atol=1e-7)
    assert np.all(np.isfinite(p_x))


def test_grad_matches_vjp():
    """A `jax.grad` of <output, top> is the same pullback as `jax.vjp` (the rule lives in the VJP)."""
    layers, x, top = make_case("residual_projection", bias=True)
    run = library_net(layers)
    probes = [jnp.zeros(s.shape) for s in jax.eval_shape(lambda v: _shapes(layers, v), jnp.asarray(x))]
    grad = jax.jit(jax.grad(lambda v: jnp.vdot(run(v, probes), top)))(jnp.asarray(x))
    _, p_x, _ = library_signals(layers, x, top)
    np.testing.assert_allclose(np.asarray(grad), p_x, rtol=1e-6, atol=1e-9)


def _shapes(layers, x):
    out = []
    for layer in layers:
        out.append(x)
        x = _lib_layer(layer, x)
    return out


def test_excite_forward_is_layer_forward():
    layers, x, _ = make_case("residual_identity", bias=True)
    conv = jax.tree.map(jnp.asarray, layers[0][1])
    np.testing.assert_array_equal(np.asarray(excite(Conv(2), x, conv)), np.asarray(Conv(2).forward(x, conv)))


# ----------------------------------------------------------------------------------------------
# A random ResNet-18 (width 0.125) with randomised BatchNorm
# ----------------------------------------------------------------------------------------------

DEPTH, WIDTH, NUM_CLASSES = 18, 0.125, 5
IMAGE_HW = (40, 48)  # stem 10x12 after max-pool, layer2 5x6, layer3 3x3, layer4 2x2
SALIENCY_LAYERS = ("stem", "layer1", "layer2", "layer3", "layer4")
TARGETS = np.array([4, 0, 2])  # images 0 and 1 are the same picture with different targets


def random_variables(shapes, seed):
    """He-normal kernels, random BN scale (20% negative), bias, running mean and variance."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(shapes)
    out = {}
    for key, value in flat.items():
        shape, leaf = value.shape, key[-1]
        if leaf == "kernel":
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif leaf == "scale":
            value = rng.uniform(0.5, 1.5, shape) * np.where(rng.random(shape) < 0.2, -1.0, 1.0)
        elif leaf == "bias":
            value = rng.normal(scale=0.2, size=shape)
        elif leaf == "mean":
            value = rng.normal(scale=0.2, size=shape)
        elif leaf == "var":
            value = rng.uniform(0.5, 2.0, shape)
        out[key] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def resnet():
    model = ResNet(depth=DEPTH, width=WIDTH, num_classes=NUM_CLASSES)
    rng = np.random.default_rng(1)
    images = rng.random((2, *IMAGE_HW, 3)).astype(np.float32)
    images = jnp.asarray(np.concatenate([images[:1], images]))  # [A, A, B]
    variables = random_variables(jax.eval_shape(model.init, jax.random.key(0), images[:1]), seed=2)
    return model, variables, fold_batchnorm(variables, DEPTH), images


def _dual(folded):
    return {**folded, "head": {"w": -folded["head"]["w"], "b": folded["head"]["b"]}}


@jax.jit
def _plain_signals(folded, images, targets):
    """Plain EBP at every saliency layer, plus the full (unsummed) signal at `stem`."""
    signals = {name: excitation_signal(folded, images, targets, saliency_layer=name, contrastive=False)
               for name in SALIENCY_LAYERS}
    stem = forward(folded, images, "input", "stem")
    _, pullback = jax.vjp(lambda a: forward(folded, a, "stem", "logits", ExcitationOps()), stem)
    signals["stem_full"] = pullback(jax.nn.one_hot(targets, NUM_CLASSES))[0]
    return signals


CONTRAST_CASES = (("stem", "stem"), ("stem", "layer4"), ("layer1", "layer1"), ("layer1", "layer3"),
                  ("layer1", "layer4"), ("layer3", "layer4"), ("layer4", "layer4"))


@jax.jit
def _contrastive_signals(folded, images, targets):
    return {f"{s}/{c}": excitation_signal(folded, images, targets, saliency_layer=s, contrast_layer=c,
                                          contrastive=True)
            for s, c in CONTRAST_CASES}


@pytest.fixture(scope="module")
def plain(resnet):
    _, _, folded, images = resnet
    return jax.tree.map(np.asarray, _plain_signals(folded, images, TARGETS))


@pytest.fixture(scope="module")
def dual(resnet):
    _, _, folded, images = resnet
    return jax.tree.map(np.asarray, _plain_signals(_dual(folded), images, TARGETS))


def test_fold_batchnorm_matches_flax_eval(resnet):
    model, variables, folded, images = resnet
    logits, features = jax.jit(model.apply)(variables, images)
    stages = jax.jit(lambda f, x: {s: forward(f, x, "input", s) for s in ("layer1", "layer2", "layer3", "layer4")})
    folded_stages = stages(folded, images)
    np.testing.assert_allclose(np.asarray(jax.jit(forward)(folded, images)), np.asarray(logits), rtol=1e-4, atol=1e-4)
    for name, value in folded_stages.items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(features[name]), rtol=1e-4, atol=1e-4, err_msg=name)
    assert float(jnp.std(logits)) > 1e-2  # the random network is not degenerate
    assert any(np.any(np.asarray(variables["params"][k]["bn1"]["scale"]) < 0) for k in variables["params"] if "_" in k)


def test_fold_batchnorm_refuses_fsm_variables():
    model = ResNet(depth=DEPTH, width=WIDTH, num_classes=NUM_CLASSES, fsm_after=2)
    images, mask = jnp.zeros((1, *IMAGE_HW, 3)), jnp.ones((1, *IMAGE_HW, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images, mask)  # no compute needed
    assert "fsm" in shapes["params"]
    with pytest.raises(ValueError, match="FSM"):
        fold_batchnorm(shapes, DEPTH)


def test_resnet_signals_are_per_image_and_per_target(plain, resnet):
    images = resnet[3]
    for name in SALIENCY_LAYERS:
        assert plain[name].shape[0] == images.shape[0]
    np.testing.assert_allclose(plain["stem_full"].sum(-1), plain["stem"], rtol=1e-5, atol=1e-8)
    assert not np.allclose(plain["layer1"][0], plain["layer1"][1])  # same image, other target


def test_contrastive_is_target_minus_dual_at_any_contrast_layer(resnet, plain, dual):
    _, _, folded, images = resnet
    contrastive = jax.tree.map(np.asarray, _contrastive_signals(folded, images, TARGETS))
    for s, c in CONTRAST_CASES:
        expected = plain[s] - dual[s]
        scale = np.abs(expected).max()
        np.testing.assert_allclose(contrastive[f"{s}/{c}"], expected, rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=f"saliency {s}, contrast {c}")
        assert expected.min() < 0 < expected.max()  # a genuine contrast, not a one-signed map


def test_contrastive_map_is_clamped_difference(resnet, plain, dual):
    _, _, folded, images = resnet
    maps = np.asarray(saliency_maps(folded, images, TARGETS, saliency_layer="layer1"))  # contrast: layer4
    diff = np.maximum(plain["layer1"] - dual["layer1"], 0.0)
    resized = np.maximum(np.asarray(jax.image.resize(diff, (diff.shape[0], *IMAGE_HW), "bilinear")), 0.0)
    expected = resized / resized.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(to_saliency_map(jnp.asarray(plain["layer1"] - dual["layer1"]), IMAGE_HW)),
                               expected, atol=1e-5)


@pytest.mark.parametrize("saliency_layer, contrast_layer", [("layer2", "layer1"), ("layer4", "stem"),
                                                            ("input", "layer4"), ("layer1", "logits")])
def test_bad_layers_raise(resnet, saliency_layer, contrast_layer):
    _, _, folded, images = resnet
    with pytest.raises(ValueError):
        excitation_signal(folded, images, TARGETS, saliency_layer=saliency_layer, contrast_layer=contrast_layer)


def test_saliency_maps_batched_jit_vmap(resnet):
    _, _, folded, images = resnet
    targets = jnp.asarray(TARGETS)
    batched = np.asarray(saliency_maps(folded, images, targets))
    assert batched.shape == (images.shape[0], *IMAGE_HW)
    assert np.all(batched >= 0) and np.all(batched <= 1)
    for m in batched:
        assert m.max() == pytest.approx(1.0) or m.max() == 0.0
    assert batched[0].max() == pytest.approx(1.0)
    assert not np.allclose(batched[0], batched[1])  # same image, different target class
    alone = np.stack([np.asarray(saliency_maps(folded, images[i : i + 1], targets[i : i + 1]))[0]
                      for i in range(images.shape[0])])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    vmapped = jax.vmap(lambda im, t: saliency_maps(folded, im[None], t[None])[0])(images, targets)
    np.testing.assert_allclose(np.asarray(vmapped), alone, atol=1e-5)


def test_plain_saliency_maps_of_plain_signal(resnet, plain):
    _, _, folded, images = resnet
    maps = np.asarray(saliency_maps(folded, images, TARGETS, saliency_layer="layer2", contrastive=False))
    np.testing.assert_allclose(maps, np.asarray(to_saliency_map(jnp.asarray(plain["layer2"]), IMAGE_HW)), atol=1e-5)
    assert np.all(maps >= 0) and np.allclose(maps.max(axis=(1, 2)), 1.0)
