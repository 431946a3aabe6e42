"""The mean saliency map, occlusion sensitivity and the faithfulness measures, against brute force.

Every expected value here is computed the slow, obvious way (one patch, one image, one forward
at a time with the plain network; NumPy's own correlation), so a wrong vmap axis, a dropped
coverage division, a label ignored or shuffled, or an inverted ranking fails a test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_search_problem

from jaxdesens.models.functional import forward
from jaxdesens.saliency.ebp import saliency_maps
from jaxdesens.saliency.faithfulness import (
    area_under,
    border_share,
    correlation,
    deletion_curve,
    deletion_masks,
    effect_share,
)
from jaxdesens.saliency.occlusion import occlusion_maps, patch_masks, patch_starts
from jaxdesens.saliency.template import mean_saliency


@pytest.fixture(scope="module")
def problem():
    folded, images, labels, _ = tiny_search_problem(size=24)
    return folded, images, labels


_forward = jax.jit(forward)


def _ce(folded, image, label):
    logits = _forward(folded, jnp.asarray(image)[None])
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray([label]))[0])


def test_patch_starts_cover_every_pixel():
    assert patch_starts(24, 8, 8).tolist() == [0, 8, 16]
    assert patch_starts(26, 8, 8).tolist() == [0, 8, 16, 18]  # the last patch ends at the border
    masks = patch_masks((10, 13), 4, 3)
    assert masks.shape == (len(patch_starts(10, 4, 3)) * len(patch_starts(13, 4, 3)), 10, 13)
    assert np.all((1 - masks).sum(0) >= 1) and np.all((1 - masks).sum(axis=(1, 2)) == 16)
    with pytest.raises(ValueError, match="patch"):
        patch_starts(8, 9, 1)


def test_occlusion_maps_equal_one_patch_at_a_time(problem):
    folded, images, labels = problem
    images, labels = images[:3], labels[:3]
    patch, stride = 8, 8
    maps = occlusion_maps(folded, images, labels, patch=patch, stride=stride, batch_size=2, chunk=3)
    expected = np.zeros_like(maps)
    for n in range(len(images)):
        base = _ce(folded, images[n], labels[n])
        for top in patch_starts(24, patch, stride):
            for left in patch_starts(24, patch, stride):
                hidden = images[n].copy()
                hidden[top:top + patch, left:left + patch] = 0.0
                expected[n, top:top + patch, left:left + patch] = _ce(folded, hidden, labels[n]) - base
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected).max() > 1e-3  # the patches matter: not a trivially zero comparison


def test_overlapping_patches_are_averaged(problem):
    folded, images, labels = problem
    maps = occlusion_maps(folded, images[:1], labels[:1], patch=8, stride=4)
    base = _ce(folded, images[0], labels[0])
    rises = []
    for top in (0, 4):  # pixel (6, 6) lies in the patches starting at 0 and 4 on each axis
        for left in (0, 4):
            hidden = images[0].copy()
            hidden[top:top + 8, left:left + 8] = 0.0
            rises.append(_ce(folded, hidden, labels[0]) - base)
    assert maps[0, 6, 6] == pytest.approx(np.mean(rises), rel=1e-4, abs=1e-5)


def test_mean_saliency_uses_each_images_own_label(problem):
    folded, images, labels = problem
    images, labels = images[:4], np.array([3, 1, 0, 2])
    single = [np.asarray(saliency_maps(folded, jnp.asarray(images[i:i + 1]), jnp.asarray(labels[i:i + 1])))[0]
              for i in range(4)]
    total = np.sum(single, axis=0)
    expected = (total - total.min()) / (total.max() - total.min())
    got = mean_saliency(folded, images, labels, batch_size=3)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for wrong in (np.zeros(4, int), labels[::-1]):  # labels ignored, labels shuffled
        assert np.abs(mean_saliency(folded, images, wrong, batch_size=3) - got).max() > 1e-2


def test_correlation_and_effect_share_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.random((9, 7)), rng.random((9, 7))
    assert correlation(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-12)
    assert correlation(a, -a) == pytest.approx(-1.0)
    occlusion = np.zeros((4, 4))
    occlusion[0, 0], occlusion[3, 3], occlusion[1, 1] = 3.0, 1.0, -5.0  # negative effects do not count
    template = np.zeros((4, 4))
    template[0, 0] = template[1, 1] = 1
    assert effect_share(occlusion, template) == pytest.approx(0.75)


def test_border_share():
    template = np.zeros((20, 20))
    template[8:12, 8:12] = 1  # 16 inner pixels
    template[0, :4] = 1  # 4 border pixels
    assert border_share(template, margin=4) == pytest.approx(4 / 20)
    assert border_share(np.zeros((20, 20))) == 0.0


def test_deletion_masks_hide_the_most_salient_first():
    saliency = np.arange(12, dtype=float).reshape(3, 4)
    masks = deletion_masks(saliency, np.array([0.0, 0.25, 1.0]))
    assert masks[0].min() == 1.0 and masks[2].max() == 0.0
    np.testing.assert_array_equal(masks[1] == 0, saliency >= 9)  # the top 3 of 12 pixels
    assert masks.sum(axis=(1, 2)).tolist() == [12, 9, 0]


def test_deletion_curve_equals_per_fraction_forward(problem):
    folded, images, labels = problem
    saliency = np.random.default_rng(1).random((24, 24))
    fractions = np.array([0.0, 0.3, 0.9])
    curve = deletion_curve(folded, images, labels, saliency, fractions)
    for value, mask in zip(curve, deletion_masks(saliency, fractions)):
        expected = np.mean([_ce(folded, images[n] * mask[:, :, None], labels[n]) for n in range(len(images))])
        assert value == pytest.approx(expected, rel=1e-4)
    assert area_under(np.ones(21)) == pytest.approx(1.0)


def test_occlusion_maps_do_not_depend_on_chunk(problem):
    folded, images, labels = problem
    small = occlusion_maps(folded, images[:2], labels[:2], patch=8, stride=8, chunk=5)  # 9 patches: 2 calls
    np.testing.assert_allclose(small, occlusion_maps(folded, images[:2], labels[:2], patch=8, stride=8, chunk=9),
                               rtol=1e-5, atol=1e-6)
