"""The custom-gradient max-pool equals Flax's max-pool and its `jax.grad`, ties included, and is
the one the ResNet, the functional network (scoring) and EBP use."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdesens.models import ResNet, functional
from jaxdesens.models.pooling import max_pool
from jaxdesens.saliency.ebp import saliency_maps


def _flax(x, window=3, stride=2, padding=1):
    return nn.max_pool(x, (window, window), (stride, stride), padding=((padding, padding), (padding, padding)))


def _brute_force_grad(x: np.ndarray, g: np.ndarray, window: int, stride: int, padding: int) -> np.ndarray:
    """The tie rule, spelled out: each output's cotangent goes to the first maximal input of its
    window in row-major order (padding never wins); overlapping windows add."""
    n, h, w, c = x.shape
    grad = np.zeros_like(x)
    for b in range(n):
        for ch in range(c):
            for oi in range(g.shape[1]):
                for oj in range(g.shape[2]):
                    best = None
                    for di in range(window):
                        for dj in range(window):
                            i, j = oi * stride + di - padding, oj * stride + dj - padding
                            inside = 0 <= i < h and 0 <= j < w
                            if inside and (best is None or x[b, i, j, ch] > x[b, best[0], best[1], ch]):
                                best = (i, j)
                    grad[b, best[0], best[1], ch] += g[b, oi, oj, ch]
    return grad


def _inputs(shape, ties: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    if ties == "rounded":  # many equal neighbours
        x = np.round(x).astype(np.float32)
    elif ties == "constant":  # every window a nine-way tie
        x = np.full(shape, 0.5, np.float32)
    return x


CASES = [  # (shape, window, stride, padding)
    ((2, 9, 9, 3), 3, 2, 1),    # odd size, the ResNet pool
    ((2, 8, 10, 2), 3, 2, 1),   # even size, the far side not read by any window
    ((1, 7, 7, 2), 2, 2, 0),    # non-overlapping windows
    ((1, 6, 5, 2), 3, 1, 1),    # stride 1: every input read by up to nine windows
]


@pytest.mark.parametrize("ties", ["none", "rounded", "constant"])
@pytest.mark.parametrize("shape,window,stride,padding", CASES)
def test_forward_and_gradient_match_flax_and_the_tie_rule(shape, window, stride, padding, ties):
    x = _inputs(shape, ties)
    y = jax.jit(max_pool, static_argnums=(1, 2, 3))(x, window, stride, padding)
    np.testing.assert_array_equal(y, _flax(jnp.asarray(x), window, stride, padding))
    g = np.random.default_rng(1).normal(size=y.shape).astype(np.float32)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(max_pool(v, window, stride, padding) * g)))(x)
    flax_grad = jax.jit(jax.grad(lambda v: jnp.sum(_flax(v, window, stride, padding) * g)))(x)
    np.testing.assert_allclose(grad, flax_grad, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, _brute_force_grad(x, g, window, stride, padding), rtol=1e-6, atol=1e-6)


def test_works_under_jit_vmap_and_bfloat16():
    x = _inputs((3, 2, 9, 9, 4), "rounded")  # a leading axis for vmap
    g = np.random.default_rng(2).normal(size=(3, 2, 5, 5, 4)).astype(np.float32)
    pooled_grad = jax.jit(jax.vmap(jax.grad(lambda v, t: jnp.sum(max_pool(v) * t))))
    expected = np.stack([_brute_force_grad(x[k], g[k], 3, 2, 1) for k in range(3)])
    np.testing.assert_allclose(pooled_grad(x, g), expected, rtol=1e-6, atol=1e-6)
    xb, gb = jnp.asarray(x[0], jnp.bfloat16), jnp.asarray(g[0], jnp.bfloat16)
    y = jax.jit(max_pool)(xb)
    grad = jax.jit(jax.grad(lambda v: jnp.sum((max_pool(v) * gb).astype(jnp.float32))))(xb)
    assert y.dtype == grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(_flax(xb), np.float32))
    reference = _brute_force_grad(np.asarray(xb, np.float32), np.asarray(gb, np.float32), 3, 2, 1)
    np.testing.assert_allclose(np.asarray(grad, np.float32), reference, rtol=2e-2, atol=2e-2)


def _scatters(fn, *args) -> int:
    """How many select-and-scatter ops (Flax's max-pool gradient) the lowered `fn` holds."""
    return jax.jit(fn).lower(*args).as_text().count("select_and_scatter")


@pytest.fixture(scope="module")
def tiny_resnet():
    model = ResNet(depth=18, num_classes=3, width=0.125)
    x = jnp.asarray(_inputs((2, 32, 32, 3), "none"))
    variables = model.init(jax.random.key(0), x)
    return model, variables, x


def test_training_scoring_and_ebp_use_the_custom_gradient(tiny_resnet):
    model, variables, x = tiny_resnet
    assert _scatters(jax.grad(lambda v: jnp.sum(_flax(v))), x) > 0  # what the check would see without it

    def train_loss(params):
        logits = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])[0][0]
        return jnp.sum(logits)

    folded = functional.fold_batchnorm(variables, 18)
    assert _scatters(jax.grad(train_loss), variables["params"]) == 0
    assert _scatters(jax.grad(lambda v: jnp.sum(functional.forward(folded, v))), x) == 0
    assert _scatters(lambda v: saliency_maps(folded, v, jnp.array([0, 1]), saliency_layer="layer2"), x) == 0
