"""Algorithm 1: candidate generation, vmapped scoring, chunk independence, template, search CLI."""

from __future__ import annotations

import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import PYTHON, ROOT, subprocess_env, tiny_search_problem

from jaxdesens.jobs.search import SearchJob, balanced_sample, grouped_sample, run_search_job
from jaxdesens.masks import levels
from jaxdesens.masks.io import load_mask
from jaxdesens.models.functional import forward
from jaxdesens.saliency.template import rescale01, threshold_template
from jaxdesens.search import (
    CPU_CHUNK,
    SearchConfig,
    auto_chunk,
    candidate_masks,
    make_candidates,
    pair_indices,
    score_masks,
    search_mask,
    table_rows,
)

SIZE = 32


@pytest.fixture(scope="module")
def tiny():
    return tiny_search_problem(SIZE)


def test_scores_equal_a_direct_loop(tiny):
    folded, images, labels, template = tiny
    masks, _ = make_candidates(jax.random.key(3), jnp.arange(5), jnp.asarray(template), SearchConfig().ranges)
    scores = score_masks(folded, jnp.asarray(images), jnp.asarray(labels), masks, jnp.float32(2.0), jnp.float32(0.0))
    for i, mask in enumerate(np.asarray(masks)):
        logits = forward(folded, images * mask[None, :, :, None])
        ce = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
        ratio = 1 - mask.mean()
        np.testing.assert_allclose(scores["ce"][i], ce, rtol=1e-5)
        np.testing.assert_allclose(scores["ratio"][i], ratio, rtol=1e-6)
        np.testing.assert_allclose(scores["objective"][i], ce - 2.0 * ratio, rtol=1e-5, atol=1e-5 * ce)


def test_candidates_keep_the_template_and_are_binary(tiny):
    template = tiny[3]
    masks = candidate_masks(template, np.arange(64), SearchConfig())
    assert set(np.unique(masks)) <= {0.0, 1.0}
    assert (masks[:, template == 1] == 1).all()
    ratios = 1 - masks.mean(axis=(1, 2))
    assert ratios.std() > 0.05  # hyper-parameters are redrawn per candidate


@pytest.mark.parametrize("floored", [False, True])
def test_result_does_not_depend_on_chunk_size(tiny, floored):
    folded, images, labels, template = tiny
    ratios = 1 - candidate_masks(template, np.arange(40), SearchConfig()).mean(axis=(1, 2))
    floor = float(np.median(ratios)) if floored else 0.0  # half the candidates are rejected unscored
    results = [search_mask(folded, images, labels, template, SearchConfig(n=40, chunk=chunk, gamma=1.0,
                                                                          min_ratio=floor))
               for chunk in (8, 16, 64)]
    for other in results[1:]:
        assert other.best_index == results[0].best_index
        np.testing.assert_allclose(other.table["objective"], results[0].table["objective"], rtol=1e-5)
        np.testing.assert_allclose(other.table["ce"], results[0].table["ce"], rtol=1e-5)
        np.testing.assert_array_equal(other.best_mask, results[0].best_mask)
    best = results[0]
    assert best.scored == (ratios >= np.float32(floor)).sum() and (best.scored < 40) == floored
    assert best.best_index == int(np.argmin(best.table["objective"]))
    np.testing.assert_array_equal(best.best_mask, candidate_masks(template, np.array([best.best_index]),
                                                                 SearchConfig())[0])
    assert sorted(best.table["index"]) == list(range(40))


MULTI_DEVICE_SEARCH = """
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
from helpers import tiny_search_problem
from jaxdesens.search import SearchConfig, search_mask
assert jax.device_count() == 4
result = search_mask(*tiny_search_problem(), SearchConfig(n=40, chunk=8, gamma=1.0, min_ratio=float(sys.argv[2])))
print(json.dumps({"best": result.best_index, "objective": result.table["objective"].tolist(), "scored": result.scored}))
"""


@pytest.mark.slow
def test_four_devices_split_the_masks_and_find_the_same_mask(tiny):
    folded, images, labels, template = tiny
    floor = 0.45
    single = search_mask(folded, images, labels, template, SearchConfig(n=40, chunk=8, gamma=1.0, min_ratio=floor))
    child = subprocess.run([PYTHON, "-c", MULTI_DEVICE_SEARCH, str(ROOT / "tests"), str(floor)],
                           env=subprocess_env(devices=4), capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    multi = json.loads(child.stdout.splitlines()[-1])
    assert multi["best"] == single.best_index and multi["scored"] == single.scored
    assert 0 < single.scored < 40
    np.testing.assert_allclose(np.array(multi["objective"], np.float32), single.table["objective"], rtol=1e-5)


def test_min_ratio_floor_and_baseline_candidates(tiny):
    folded, images, labels, template = tiny
    floor = search_mask(folded, images, labels, template, SearchConfig(n=32, chunk=16, min_ratio=0.7))
    assert floor.best()["ratio"] >= 0.7
    below = floor.table["ratio"] < 0.7
    assert below.any() and not below.all()
    assert np.isinf(floor.table["objective"][below]).all() and np.isnan(floor.table["ce"][below]).all()
    assert floor.scored == (~below).sum()
    # candidates above the floor score exactly as without one
    free = search_mask(folded, images, labels, template, SearchConfig(n=32, chunk=16))
    np.testing.assert_allclose(floor.table["objective"][~below], free.table["objective"][~below], rtol=1e-5)
    rows = table_rows(floor)
    assert json.loads(json.dumps(rows, allow_nan=False)) == rows  # strict JSON: rejected rows carry null
    assert rows[-1]["objective"] is None and rows[-1]["ce"] is None and rows[0]["objective"] is not None
    with pytest.raises(ValueError, match="min_ratio"):
        search_mask(folded, images, labels, np.ones_like(template), SearchConfig(n=8, chunk=8, min_ratio=0.5))
    level = levels.masks_at_level(jax.random.key(0), 4, 24, SIZE, SIZE)
    baseline = search_mask(folded, images, labels, template, SearchConfig(n=1, chunk=8), candidates=level)
    assert len(baseline.table["ratio"]) == 24
    assert ((baseline.table["ratio"] > 0.4) & (baseline.table["ratio"] <= 0.5)).all()


def test_threshold_template_and_chunk_heuristic():
    mean_map = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    assert threshold_template(mean_map, 0.5).sum() == 8
    assert threshold_template(mean_map, 0.9).sum() < threshold_template(mean_map, 0.3).sum()
    with pytest.raises(ValueError, match="--T"):
        threshold_template(mean_map, 1.5)
    assert auto_chunk(32, (112, 112, 3), 64, 2) == CPU_CHUNK  # this machine's CPU

    class Accelerator:
        platform = "gpu"

        def __init__(self, gib):
            self.gib = gib

        def memory_stats(self):
            return {"bytes_limit": self.gib * 2**30}

    # ResNet-34 at 112 px, B=32, bf16: 38.5 MB of stem activations per mask
    assert auto_chunk(32, (112, 112, 3), 64, 2, Accelerator(80)) == 512  # a quarter of 80 GiB, a power of two
    assert auto_chunk(32, (112, 112, 3), 64, 2, Accelerator(1)) == 8     # never below 8
    assert auto_chunk(1, (32, 32, 3), 8, 2, Accelerator(80)) == 1024     # nor above 1024


def test_balanced_sample_covers_identities_first():
    labels = np.repeat(np.arange(5), 4)
    picked = balanced_sample(labels, 5, np.random.default_rng(0))
    assert sorted(labels[picked]) == [0, 1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.compute_bound
def test_search_on_att_hides_most_and_beats_random_masks(att_clean_workdir, att_dir, tmp_path):
    out = tmp_path / "search"
    job = SearchJob(checkpoint=str(att_clean_workdir), out=str(out), n=256, K=64, T=0.6, batch_images=64, seed=0)
    summary = run_search_job(job, progress=False, log=lambda _: None)
    assert summary["settings"]["objective"] == "verification" and summary["scoring_images"] == 64
    # Measured on this fixture with the suite's two workers: the pair-error search hides 88.0% and the
    # clean model verifies 77.0% of the held-out pairs under it, against 76.2 +- 3.6% under 16 random
    # masks of its ratio (in a single pytest process the fixture trains to other weights: 89.4%, 81.3%
    # against 74.9 +- 3.5%). The margin depends on the model: 1.5-2.2 std on the README's (README, "Search").
    assert summary["ratio"] >= 0.8, summary["ratio"]
    v = summary["verification"]
    assert len(v["random_same_ratio_ratios"]) == 16
    assert v["searched_mask"] > v["random_same_ratio_mean"], v
    # The template sits where occlusion says the recognizer looks (measured: r 0.77, 3.0x its area
    # share of the occlusion effect, no pixel at the border; insertion AUC 9.1 against 11.3 +- 0.9).
    f = summary["faithfulness"]
    assert f["ebp_occlusion_correlation"] >= 0.6, f["ebp_occlusion_correlation"]
    assert f["occlusion_share_over_area"] >= 2.0 and f["template_border_share"] <= 0.1, f
    assert f["insertion_auc"]["ebp"] < f["insertion_auc"]["random"] - f["insertion_auc_random_std"], f
    np.testing.assert_allclose(f["template_area"], load_mask(out / "template.png").mean())
    occlusion = np.load(out / "occlusion.npy")
    assert occlusion.shape == (64, 64) and occlusion.max() > 1.0  # nats of cross-entropy
    mask = load_mask(out / "mask.png")
    np.testing.assert_array_equal(mask, np.load(out / "mask.npy"))
    np.testing.assert_allclose(1 - mask.mean(), summary["ratio"], atol=1e-6)
    template = load_mask(out / "template.png")
    assert (mask[template == 1] == 1).all()
    rows = json.loads((out / "candidates.json").read_text())
    assert len(rows) == 256 and rows[0]["index"] == summary["best_index"]
    assert {"rmg_min_vertex", "rmg_max_angle", "pair_error", "ratio"} <= set(rows[0]) and "ce" not in rows[0]
    for name in ("top_masks.png", "template_thresholds.png", "mean_saliency.npy", "summary.json", "faithfulness.png",
                 "occlusion.png"):
        assert (out / name).exists()
    by_occlusion = run_search_job(SearchJob(checkpoint=str(att_clean_workdir), out=str(tmp_path / "occ"), n=16, K=16,
                                            T=0.6, saliency="occlusion", faithfulness=False, evaluate=False),
                                  progress=False, log=lambda _: None)
    np.testing.assert_array_equal(load_mask(tmp_path / "occ" / "template.png"), threshold_template(
        rescale01(np.load(tmp_path / "occ" / "occlusion.npy")), 0.6))
    assert "faithfulness" not in by_occlusion
    with pytest.raises(ValueError, match="inside the data folder"):
        run_search_job(SearchJob(checkpoint=str(att_clean_workdir), out=str(att_dir / "search")), log=lambda _: None)
    with pytest.raises(ValueError, match="checkpoint workdir"):
        run_search_job(SearchJob(checkpoint=str(att_clean_workdir), out=str(att_clean_workdir)), log=lambda _: None)
    assert not (att_dir / "search").exists()
    with pytest.raises(ValueError, match="raise --T"):
        run_search_job(SearchJob(checkpoint=str(att_clean_workdir), out=str(tmp_path / "big"), K=8, T=0.0),
                       progress=False, log=lambda _: None)
    ablation = run_search_job(SearchJob(checkpoint=str(att_clean_workdir), out=str(tmp_path / "no_ebp"), n=64, K=8,
                                        without_ebp=True, evaluate=False), progress=False, log=lambda _: None)
    assert ablation["template_kept"] == 0.0
    paper = run_search_job(SearchJob(checkpoint=str(att_clean_workdir), out=str(tmp_path / "paper"), n=16, K=8, T=0.6,
                                     objective="ce", faithfulness=False, evaluate=False),
                           progress=False, log=lambda _: None)
    assert paper["gamma"] == pytest.approx(np.log(30)) and paper["scoring_images"] == 32 and paper["ce"] > 0, paper
    rows = json.loads((tmp_path / "paper" / "candidates.json").read_text())
    assert "ce" in rows[0] and "pair_error" not in rows[0]


def test_pair_error_is_one_minus_the_roc_auc_of_the_models_masked_embeddings():
    """The verification objective against the Flax model's own embedding and the metrics' AUC."""
    from jaxdesens.metrics.verification import roc_auc
    from jaxdesens.models import ResNet
    from jaxdesens.models.functional import fold_batchnorm

    model = ResNet(depth=18, num_classes=4, width=0.125)
    images = np.asarray(jax.random.uniform(jax.random.key(0), (8, SIZE, SIZE, 3)))
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 0])
    variables = model.init(jax.random.key(1), images)
    masks = np.asarray(candidate_masks(np.zeros((SIZE, SIZE), np.float32), np.arange(3), SearchConfig()))
    pairs = pair_indices(labels)
    scores = score_masks(fold_batchnorm(variables, 18), jnp.asarray(images), pairs, jnp.asarray(masks),
                         jnp.float32(0.5), jnp.float32(0.0), objective="verification")
    left, right = np.triu_indices(len(labels), 1)
    for i, mask in enumerate(masks):
        _, features = model.apply(variables, images * mask[None, :, :, None])
        emb = np.asarray(features["embedding"])
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        auc = roc_auc(np.sum(emb[left] * emb[right], axis=1), labels[left] == labels[right])
        np.testing.assert_allclose(scores["pair_error"][i], 1 - auc, atol=1e-5)
        np.testing.assert_allclose(scores["objective"][i], 1 - auc - 0.5 * (1 - mask.mean()), atol=1e-5)
    assert len(set(np.round(np.asarray(scores["pair_error"]), 6))) == 3  # the masks change the embeddings
    hidden = score_masks(fold_batchnorm(variables, 18), jnp.asarray(images), pairs, jnp.zeros((1, SIZE, SIZE)),
                         jnp.float32(0.5), jnp.float32(0.0), objective="verification")
    assert float(hidden["pair_error"][0]) == 0.5  # all-hidden images are all alike: every pair ties
    with pytest.raises(ValueError, match="two images of one identity"):
        pair_indices(np.arange(4))


def test_verification_search_scores_identity_groups(tiny, tmp_path):
    """grouped_sample gives the pairs the objective needs; the search table names the loss."""
    labels = np.repeat(np.arange(10), 5)
    picked = grouped_sample(labels, 12, 4, np.random.default_rng(0))
    assert len(picked) == 12 and sorted(np.bincount(labels[picked])[np.bincount(labels[picked]) > 0]) == [4, 4, 4]
    folded, images, labels6, template = tiny
    config = SearchConfig(n=16, gamma=0.5, objective="verification", batch_images=6)
    result = search_mask(folded, images, labels6, template, config)
    assert "pair_error" in result.table and "ce" not in result.table
    assert 0.0 <= result.best()["pair_error"] <= 1.0
    with pytest.raises(ValueError, match="--objective"):
        SearchConfig(objective="accuracy")
