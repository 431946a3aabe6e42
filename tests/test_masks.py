"""Free-form strokes, hole-ratio levels and mask files (tiny sizes; one jitted call per test)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdesens.data.errors import DataError
from jaxdesens.masks import (
    LEVELS,
    StrokeParams,
    StrokeRanges,
    draw_strokes,
    level_masks,
    level_of,
    load_mask,
    make_level_bank,
    mask_ratio,
    masks_at_level,
    random_strokes,
    rasterise_capsules,
    sample_stroke_params,
    save_mask,
)

SIZE = 32
N = 256


@pytest.fixture(scope="module")
def strokes() -> np.ndarray:
    return np.asarray(random_strokes(jax.random.key(0), N, SIZE, SIZE))


@pytest.fixture(scope="module")
def bank() -> np.ndarray:
    return make_level_bank(jax.random.key(1), SIZE, SIZE, per_level=8, batch=N)


def _params(n: int, length: float, brush: float) -> StrokeParams:
    def full(value, dtype=jnp.float32):
        return jnp.full((n,), value, dtype)

    return StrokeParams(full(2, jnp.int32), full(6, jnp.int32), full(length), full(brush), full(math.pi))


# --- free-form strokes -------------------------------------------------------------------------


def test_strokes_are_binary_float32_with_ratio_in_unit_interval(strokes):
    assert strokes.shape == (N, SIZE, SIZE) and strokes.dtype == np.float32
    assert set(np.unique(strokes)) <= {0.0, 1.0}
    ratios = np.asarray(mask_ratio(strokes))
    assert ratios.shape == (N,) and ((ratios >= 0) & (ratios <= 1)).all()
    assert 0 < ratios.min() and ratios.max() < 1  # every mask has some stroke, none covers all
    np.testing.assert_allclose(mask_ratio(strokes[0]), ratios[0], atol=1e-6)
    np.testing.assert_allclose(mask_ratio(strokes[..., None]), ratios, atol=1e-6)


def test_mask_ratio_is_the_counted_hidden_share():
    rng = np.random.default_rng(0)
    masks = (rng.random((5, 7, 9)) < np.linspace(0.1, 0.9, 5)[:, None, None]).astype(np.uint8)  # 1 = visible
    counted = np.array([np.count_nonzero(m == 0) / m.size for m in masks])
    assert counted.min() < 0.3 and counted.max() > 0.7
    np.testing.assert_allclose(mask_ratio(masks), counted, rtol=1e-12)  # NumPy in, float64 out
    np.testing.assert_allclose(mask_ratio(jnp.asarray(masks)), counted, rtol=1e-6)  # JAX (also under jit)
    np.testing.assert_allclose(jax.jit(mask_ratio)(masks[..., None].astype(np.float32)), counted, rtol=1e-6)
    assert float(mask_ratio(masks[0].astype(bool))) == pytest.approx(counted[0])
    with pytest.raises(ValueError, match="mask_ratio expects"):
        mask_ratio(np.ones(4))


@pytest.mark.parametrize(("length", "brush"), [(0.5, 0.0), (0.0, 0.0)])
def test_zero_width_draws_nothing(length, brush):
    masks = draw_strokes(jax.random.key(2), _params(8, length, brush), SIZE, SIZE, max_strokes=4, vertex_cap=8)
    assert not np.asarray(masks).any()


def test_same_key_same_masks_different_key_different_masks(strokes):
    again = np.asarray(random_strokes(jax.random.key(0), N, SIZE, SIZE))
    other = np.asarray(random_strokes(jax.random.key(3), N, SIZE, SIZE))
    np.testing.assert_array_equal(strokes, again)
    assert (other != strokes).any(axis=(1, 2)).mean() > 0.95


def test_thousand_masks_in_one_call_each_with_own_params():
    ranges = StrokeRanges()
    params = jax.device_get(sample_stroke_params(jax.random.key(4), 1000, ranges))
    for name, values in params._asdict().items():
        assert values.shape == (1000,) and values.std() > 0, name
    low, high = ranges.max_brush_width
    assert low <= params.max_brush_width.min() and params.max_brush_width.max() <= high
    assert (params.max_vertex >= params.min_vertex).all()
    masks = draw_strokes(
        jax.random.key(5), params, SIZE, SIZE, max_strokes=ranges.max_strokes, vertex_cap=ranges.vertex_cap
    )
    assert masks.shape == (1000, SIZE, SIZE)
    assert np.unique(np.asarray(mask_ratio(masks))).size > 200


def _numpy_capsule(a, b, radius, height, width):
    """Independent reference: perpendicular distance inside the segment, endpoint distance outside."""
    ys, xs = np.mgrid[:height, :width] + 0.5
    p = np.stack([xs, ys], -1)
    a, b = np.asarray(a, float), np.asarray(b, float)
    e = b - a
    length = np.hypot(*e)
    to_a, to_b = np.linalg.norm(p - a, axis=-1), np.linalg.norm(p - b, axis=-1)
    if length == 0:
        return to_a, to_a < radius
    along = ((p - a) @ e) / length
    perpendicular = np.abs((p - a)[..., 0] * e[1] - (p - a)[..., 1] * e[0]) / length
    dist = np.where((along >= 0) & (along <= length), perpendicular, np.minimum(to_a, to_b))
    return dist, dist < radius


@pytest.mark.parametrize(
    ("a", "b", "radius"),
    [
        ((3.2, 4.7), (25.9, 19.3), 3.1),
        ((30.0, 2.0), (4.5, 28.25), 1.4),
        ((16.0, 16.0), (16.0, 16.0), 5.0),  # zero length: a disc
        ((2.0, 2.0), (30.0, 30.0), 0.0),  # zero width: nothing
    ],
)
def test_capsule_rasteriser_matches_numpy(a, b, radius):
    starts, ends, radii = (jnp.array([[v]], jnp.float32) for v in (a, b, radius))
    got = np.asarray(rasterise_capsules(starts, ends, radii, SIZE, SIZE))[0]
    dist, want = _numpy_capsule(a, b, radius, SIZE, SIZE)
    clear = np.abs(dist - radius) > 1e-4  # pixels on the boundary may round either way
    np.testing.assert_array_equal(got[clear], want[clear])
    assert clear.mean() > 0.9


def test_stroke_coverage_scales_with_image_size(strokes):
    large = random_strokes(jax.random.key(0), N, 2 * SIZE, 2 * SIZE)
    small_ratio, large_ratio = float(mask_ratio(strokes).mean()), float(mask_ratio(large).mean())
    assert abs(small_ratio - large_ratio) < 0.04, (small_ratio, large_ratio)


# --- hole-ratio levels -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "level"),
    [(0.0, -1), (0.01, -1), (0.0101, 0), (0.1, 0), (0.1001, 1), (0.35, 3), (0.6, 5), (0.6001, -1), (1.0, -1)]
    + [(-0.5, -1), (math.nan, -1)],
)
def test_level_of_uses_half_open_intervals(ratio, level):
    assert level_of(ratio) == level


def test_level_bank_masks_fall_in_their_bucket(bank):
    assert bank.shape == (len(LEVELS), 8, SIZE, SIZE) and bank.dtype == np.uint8
    assert set(np.unique(bank)) <= {0, 1}
    ratios = np.asarray(mask_ratio(bank.reshape(-1, SIZE, SIZE).astype(np.float32))).reshape(len(LEVELS), 8)
    for index, row in enumerate(ratios):
        assert all(level_of(float(r)) == index for r in row), (index, row)


def test_level_masks_draw_from_the_bank(bank):
    drawn = np.asarray(jax.jit(level_masks, static_argnums=2)(jax.random.key(6), jnp.asarray(bank), 64))
    assert drawn.shape == (64, SIZE, SIZE) and drawn.dtype == np.float32
    flat = bank.reshape(-1, SIZE * SIZE).astype(np.float32)
    found = [np.flatnonzero((flat == m.reshape(1, -1)).all(axis=1)) for m in drawn]
    assert all(f.size for f in found)
    assert len({int(f[0]) // 8 for f in found}) >= 4  # levels are mixed


def test_masks_at_level_holds_one_bucket():
    masks = masks_at_level(jax.random.key(7), 5, 12, SIZE, SIZE, batch=N)
    assert masks.shape == (12, SIZE, SIZE) and masks.dtype == np.float32
    assert all(level_of(float(r)) == 5 for r in np.asarray(mask_ratio(masks)))


def test_unfillable_level_raises_clear_error():
    with pytest.raises(RuntimeError, match=r"\(0\.99, 1\.0\) has 0/4"):
        make_level_bank(jax.random.key(8), SIZE, SIZE, per_level=4, levels=((0.99, 1.0),), batch=N, max_rounds=2)


# --- mask files --------------------------------------------------------------------------------


def test_save_load_round_trip_and_atomic(tmp_path, strokes):
    mask = 1 - strokes[0]
    png, npy = save_mask(tmp_path / "sub" / "best.png", mask)
    assert {p.name for p in (tmp_path / "sub").iterdir()} == {"best.png", "best.npy"}  # no temp files left
    np.testing.assert_array_equal(load_mask(png), mask)
    np.testing.assert_array_equal(load_mask(npy), mask)
    assert set(np.unique(np.asarray(Image.open(png)))) <= {0, 255}
    assert load_mask(npy).dtype == np.float32


def test_load_png_any_mode_thresholds_and_resizes_nearest(tmp_path):
    grey = np.array([[0, 127], [128, 255]], np.uint8)
    Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "rgb.png"), [[0, 0], [1, 1]])
    doubled = np.repeat(np.repeat([[0, 0], [1, 1]], 2, 0), 2, 1)
    np.testing.assert_array_equal(load_mask(tmp_path / "rgb.png", size=4), doubled)
    assert load_mask(tmp_path / "rgb.png", size=(3, 1)).shape == (3, 1)


def _write(path, content):
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.png", None, "not found"),
        ("garbage.png", b"not a png", "cannot read"),
        ("garbage.npy", b"not a npy", "cannot read"),
        ("cube.npy", np.zeros((2, 3, 4)), "shape"),
        ("grey.npy", np.full((4, 4), 0.5), "0 \\(hidden\\) or 1"),
        ("mask.txt", b"0 1", "unknown mask suffix"),
    ],
)
def test_bad_mask_files_raise_data_error_naming_the_path(tmp_path, name, content, message):
    path = tmp_path / name if content is None else _write(tmp_path / name, content)
    with pytest.raises(DataError, match=message) as info:
        load_mask(path)
    assert str(path) in str(info.value)
