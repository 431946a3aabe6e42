"""The CPU convolution policy: the alternative algorithms are the same linear map as XLA's
convolution, im2col is chosen where a map is smaller than the kernel, and the XLA flag is applied
only where it is safe, takes effect in a fresh process and leaves the numbers unchanged."""

import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PYTHON, subprocess_env
from jax import lax

from jaxdesens import xla_flags
from jaxdesens.models import conv


def _reference(x, w, stride, padding):
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=conv.DIMENSIONS)


CASES = [  # (image size, kernel, stride, padding, input channels)
    (56, 7, 2, ((3, 3), (3, 3)), 3),   # the ResNet stem
    (33, 7, 2, ((3, 3), (3, 3)), 3),   # odd size
    (20, 3, 2, ((1, 1), (1, 1)), 2),
    (17, 4, 2, ((1, 2), (0, 1)), 3),   # kernel a multiple of the stride, uneven padding
    (19, 5, 3, ((2, 2), (2, 2)), 1),
    (2, 3, 1, ((1, 1), (1, 1)), 8),    # input map smaller than the kernel (im2col's case)
    (4, 3, 2, ((1, 1), (1, 1)), 8),    # output map smaller than the kernel (layer4's first conv at 64 px)
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


@pytest.mark.parametrize("x_shape,w_shape,stride,expected", [
    ((64, 4, 4, 256), (3, 3, 256, 512), 2, True),     # layer4's first conv at 64 px: 4 -> 2 px
    ((64, 2, 2, 512), (3, 3, 512, 512), 1, True),     # layer4's other convs: a 2 px input
    ((64, 8, 8, 128), (3, 3, 128, 256), 2, False),    # layer3's first conv: 8 -> 4 px
    ((64, 4, 4, 256), (1, 1, 256, 512), 2, False),    # the 1x1 projection
    ((64, 64, 64, 3), (7, 7, 3, 64), 2, False),       # the stem
    ((1, 9, 2, 4), (3, 3, 4, 4), 1, True),            # narrow in one direction only
])
def test_im2col_is_chosen_where_input_or_output_map_is_smaller_than_the_kernel(x_shape, w_shape, stride, expected):
    assert conv.map_smaller_than_kernel(x_shape, w_shape, stride, ((1, 1), (1, 1))) is expected


def test_conv2d_uses_im2col_for_an_output_smaller_than_the_kernel(monkeypatch):
    calls = []
    original = conv._by_matmul
    monkeypatch.setattr(conv, "_by_matmul", lambda *a: calls.append(a[0].shape) or original(*a))
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3))
    conv.conv2d(x, w, 2, ((1, 1), (1, 1)))
    conv.conv2d(jnp.ones((1, 8, 8, 2)), w, 2, ((1, 1), (1, 1)))
    assert calls == [(1, 4, 4, 2)]


def test_convolution_flag_is_applied_only_where_safe():
    flag = xla_flags.CONVOLUTION_FLAG
    for version in xla_flags.VERIFIED_JAXLIB:
        environ = {}
        assert xla_flags.set_convolution_flag(environ, version) == xla_flags.APPLIED
        assert environ == {"XLA_FLAGS": flag}
    for user in ("", "--xla_force_host_platform_device_count=2"):  # a user's flags, even empty, stay
        environ = {"XLA_FLAGS": user}
        assert xla_flags.set_convolution_flag(environ, "0.10.2") == xla_flags.USER_FLAGS
        assert environ == {"XLA_FLAGS": user}
    environ = {}
    assert "not applied" in xla_flags.set_convolution_flag(environ, "0.11.2")  # not verified: might abort XLA
    assert environ == {}


# A fresh process: imports the project before JAX starts, then reports the flag's state and a
# ResNet's logits and gradients (YNNPACK handles some of this tiny network's convolutions by default).
_CHILD = """
import json, os, re, sys
import jax, jax.numpy as jnp
import numpy as np
from jaxdesens import xla_flags
from jaxdesens.models import ResNet
from jaxdesens.models.functional import fold_batchnorm, forward
model = ResNet(depth=18, num_classes=4, width=0.25)
x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
variables = jax.jit(model.init)(jax.random.key(1), x)  # jitted: one compile, not one per op
folded = jax.jit(fold_batchnorm, static_argnums=1)(variables, 18)
compiled = jax.jit(forward).lower(folded, x).compile()
hlo = compiled.as_text()
ynn = re.findall(r'%ynn_fusion[.0-9]* = .*op_name="[^"]*conv_general_dilated"', hlo)
loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])[0][0] ** 2)
grads = jax.jit(jax.grad(loss))(variables["params"])
leaves = {".".join(str(getattr(e, "key", e)) for e in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]}
np.savez(sys.argv[1], logits=compiled(folded, x), **leaves)
print(json.dumps({"status": xla_flags.STATUS, "xla_flags": os.environ.get("XLA_FLAGS"),
                  "devices": jax.device_count(), "ynn_convolutions": len(ynn)}))
"""


@pytest.mark.slow
def test_fresh_process_gets_the_flag_and_the_same_numbers(tmp_path):
    """Without XLA_FLAGS the project sets the flag and it takes effect (no convolution on YNNPACK);
    a user's XLA_FLAGS is left alone (YNNPACK keeps its convolutions); both compute the same numbers.
    Imported after JAX started its backend, the project says the flag is not in effect."""
    env = subprocess_env()
    env.pop("XLA_FLAGS")
    user_env = {**subprocess_env(devices=2), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    reports = {}
    for name, child_env in (("project", env), ("user", user_env)):
        out = subprocess.run([PYTHON, "-c", _CHILD, str(tmp_path / f"{name}.npz")], env=child_env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        reports[name] = json.loads(out.stdout.strip().splitlines()[-1])
    if xla_flags.installed_jaxlib() in xla_flags.VERIFIED_JAXLIB:
        assert reports["project"] == {"status": xla_flags.APPLIED, "xla_flags": xla_flags.CONVOLUTION_FLAG,
                                      "devices": 1, "ynn_convolutions": 0}
        assert reports["user"]["ynn_convolutions"] > 0  # so the comparison below crosses the two paths
    assert reports["user"]["status"] == xla_flags.USER_FLAGS
    assert reports["user"]["xla_flags"] == user_env["XLA_FLAGS"] and reports["user"]["devices"] == 2
    late = subprocess.run([PYTHON, "-c", "import jax; jax.devices(); import jaxdesens; "
                           "print(jaxdesens.xla_flags.STATUS)"], env=env, capture_output=True, text=True, timeout=120)
    if xla_flags.installed_jaxlib() in xla_flags.VERIFIED_JAXLIB:  # JAX started first: said, not hidden
        assert late.stdout.strip() == xla_flags.TOO_LATE and "UserWarning" in late.stderr, late.stderr[-2000:]
    project, user = np.load(tmp_path / "project.npz"), np.load(tmp_path / "user.npz")
    assert sorted(project.files) == sorted(user.files) and len(project.files) > 40
    for key in project.files:  # rounding of two convolution libraries: under 1e-6 of a leaf's largest value
        scale = float(np.abs(user[key]).max())
        np.testing.assert_allclose(project[key], user[key], rtol=1e-4, atol=1e-5 * scale, err_msg=key)
