"""ResNet shapes and parameter counts, the FSM branch, bf16 compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdesens.models import ResNet
from jaxdesens.models.fsm import FeatureSelectionMasknet

IMAGES = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))


def _count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def test_resnet34_matches_torchvision_parameter_count():
    model = ResNet(depth=34, num_classes=1000)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))
    assert _count(shapes["params"]) == 21_797_672  # torchvision.models.resnet34()
    shapes18 = jax.eval_shape(ResNet(depth=18, num_classes=1000).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert _count(shapes18["params"]) == 11_689_512


@pytest.fixture(scope="module")
def fsm_model():
    model = ResNet(depth=18, num_classes=5, width=0.125, fsm_after=2)
    variables = model.init(jax.random.key(0), IMAGES, jnp.ones((32, 32)))
    # Make BatchNorm non-trivial so equalities are not vacuous.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 * jax.random.normal(jax.random.key(len(str(p))), a.shape)
        if any(getattr(k, "key", "") in ("scale", "bias", "mean") for k in p) else a, variables)
    return model, variables


def test_features_and_shapes(fsm_model):
    model, variables = fsm_model
    logits, features = model.apply(variables, IMAGES, jnp.ones((32, 32)))
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    assert [features[k].shape for k in ("layer1", "layer2", "layer3", "layer4", "embedding")] == [
        (3, 8, 8, 8), (3, 4, 4, 16), (3, 2, 2, 32), (3, 1, 1, 64), (3, 64)]


def test_fsm_with_all_ones_mask_is_exactly_the_backbone(fsm_model):
    model, variables = fsm_model
    plain = ResNet(depth=18, num_classes=5, width=0.125)
    backbone = {c: {k: v for k, v in variables[c].items() if k != "fsm"} for c in variables}
    plain_logits, plain_features = plain.apply(backbone, IMAGES)
    for mask in (jnp.ones((32, 32)), jnp.ones((3, 32, 32, 1))):
        logits, features = model.apply(variables, IMAGES, mask)
        np.testing.assert_array_equal(logits, plain_logits)
        np.testing.assert_array_equal(features["embedding"], plain_features["embedding"])
    # A real mask changes the function.
    holes = jnp.ones((32, 32)).at[8:24, 8:24].set(0)
    assert not np.allclose(model.apply(variables, IMAGES, holes)[0], plain_logits)


def test_feature_selection_only_gates_hidden_cells():
    fsm = FeatureSelectionMasknet(channels=4)
    mask = jnp.ones((2, 16, 16, 1)).at[:, :, :8].set(0)  # left half hidden
    variables = fsm.init(jax.random.key(0), mask, (4, 4), False)
    selection = fsm.apply(variables, mask, (4, 4), False)
    assert selection.shape == (2, 4, 4, 4)
    np.testing.assert_array_equal(selection[:, :, 2:], 1.0)  # visible cells pass unchanged
    assert (selection[:, :, :2] < 1).all() and (selection[:, :, :2] > 0).all()


def test_last_batchnorm_scale_is_one_unless_zero_init_residual_is_asked():
    """Default scale 1 (issue 12: zero-initialised residual branches left short trainings with EBP maps on the
    projection shortcuts' stride grid); zero_init_residual=True keeps the Goyal et al. option."""
    default = ResNet(depth=18, num_classes=3, width=0.125).init(jax.random.key(0), IMAGES)["params"]
    zeroed = ResNet(depth=18, num_classes=3, width=0.125, zero_init_residual=True).init(jax.random.key(0), IMAGES)
    assert all(float(default[f"layer{s}_0"]["bn2"]["scale"].min()) == 1.0 for s in range(1, 5))
    assert all(float(jnp.abs(zeroed["params"][f"layer{s}_0"]["bn2"]["scale"]).max()) == 0.0 for s in range(1, 5))
    assert float(zeroed["params"]["layer1_0"]["bn1"]["scale"].min()) == 1.0


def test_bf16_compute_keeps_float32_parameters():
    model = ResNet(depth=18, num_classes=3, width=0.125, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), IMAGES)
    assert {a.dtype for a in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    logits, features = model.apply(variables, IMAGES)
    assert features["layer1"].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    reference = ResNet(depth=18, num_classes=3, width=0.125).apply(variables, IMAGES)[0]
    np.testing.assert_allclose(logits, reference, atol=0.1)


def test_bad_model_settings():
    with pytest.raises(ValueError, match="depth"):
        ResNet(depth=50).init(jax.random.key(0), IMAGES)
    with pytest.raises(ValueError, match="fsm_after"):
        ResNet(depth=18, fsm_after=5).init(jax.random.key(0), IMAGES, jnp.ones((32, 32)))


def test_one_shared_mask_equals_the_mask_repeated_per_image(fsm_model):
    """The FSM branch runs once for a shared mask; BatchNorm statistics and gradients agree.

    The images are left unmasked: exact zeros in masked images tie in the max-pool, and two
    compiled programs may route a tied gradient to different (equally valid) inputs."""
    model, variables = fsm_model
    mask = jnp.ones((1, 32, 32, 1)).at[:, 4:20, 6:30].set(0)
    repeated = jnp.broadcast_to(mask, (3, 32, 32, 1))

    def loss(params, m):
        (logits, _), updates = model.apply({**variables, "params": params}, IMAGES, m, train=True,
                                           mutable=["batch_stats"])
        return logits.sum(), updates

    (a, stats_a), grads_a = jax.value_and_grad(loss, has_aux=True)(variables["params"], mask)
    (b, stats_b), grads_b = jax.value_and_grad(loss, has_aux=True)(variables["params"], repeated)
    np.testing.assert_allclose(a, b, rtol=1e-4)
    for x, y in zip(jax.tree.leaves(stats_a), jax.tree.leaves(stats_b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    # Gradients: the same function of the parameters, summed in another order through the
    # train-mode BatchNorm backward (which subtracts batch means), so a looser float tolerance.
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(x, y, rtol=3e-2, atol=1e-3)
