"""The alternative convolution algorithms are the same linear map as XLA's convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxdesens.models import conv


def _reference(x, w, stride, padding):
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=conv.DIMENSIONS)


CASES = [  # (image size, kernel, stride, padding, input channels)
    (56, 7, 2, ((3, 3), (3, 3)), 3),   # the ResNet stem
    (33, 7, 2, ((3, 3), (3, 3)), 3),   # odd size
    (20, 3, 2, ((1, 1), (1, 1)), 2),
    (17, 4, 2, ((1, 2), (0, 1)), 3),   # kernel a multiple of the stride, uneven padding
    (19, 5, 3, ((2, 2), (2, 2)), 1),
    (2, 3, 1, ((1, 1), (1, 1)), 8),    # map smaller than the kernel (im2col's case)
]


@pytest.mark.parametrize("algorithm,size,kernel,stride,padding,cin",
                         [("space_to_depth", *case) for case in CASES]
                         + [("matmul", *case) for case in CASES if case[1] <= 4])  # im2col compiles k*k slices
def test_algorithm_matches_xla_convolution_and_its_gradients(size, kernel, stride, padding, cin, algorithm):
    fn = {"space_to_depth": conv._by_space_to_depth, "matmul": conv._by_matmul}[algorithm]
    kx, kw = jax.random.split(jax.random.key(size * kernel + stride))
    x = jax.random.normal(kx, (2, size, size + 1, cin))
    w = jax.random.normal(kw, (kernel, kernel, cin, 5))
    expected = _reference(x, w, stride, padding)
    got = fn(x, w, stride, padding)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    probe = jax.random.normal(jax.random.key(7), expected.shape)
    grads = jax.grad(lambda a, b: jnp.sum(fn(a, b, stride, padding) * probe), argnums=(0, 1))(x, w)
    expected_grads = jax.grad(lambda a, b: jnp.sum(_reference(a, b, stride, padding) * probe), argnums=(0, 1))(x, w)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-3)


def test_space_to_depth_is_used_only_when_enabled_for_strided_few_channel_convolutions(monkeypatch):
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
    w = jax.random.normal(jax.random.key(1), (7, 7, 3, 4))
    calls = []
    original = conv._by_space_to_depth
    monkeypatch.setattr(conv, "_by_space_to_depth", lambda *a: calls.append(a[2]) or original(*a))
    padding = ((3, 3), (3, 3))
    conv.conv2d(x, w, 2, padding)
    assert calls == []
    monkeypatch.setattr(conv, "SPACE_TO_DEPTH", True)
    out = conv.conv2d(x, w, 2, padding)
    conv.conv2d(x, w, 1, padding)                                  # stride 1: nothing to gain
    conv.conv2d(jnp.ones((1, 16, 16, 64)), jnp.ones((3, 3, 64, 4)), 2, ((1, 1), (1, 1)))  # many channels
    assert calls == [2]
    np.testing.assert_allclose(out, _reference(x, w, 2, padding), rtol=1e-5, atol=1e-4)
