"""Wiring between the pieces, checked by behaviour on tiny synthetic data (no real-data variables):
training and evaluation see `x * m`, hidden pixels never reach a mask-trained model, and every
reported mask ratio is the share of hidden pixels counted independently.

The references here are written out by hand (`hidden_share`, `x * m` in NumPy, `model.apply`),
not taken from the library's own helpers.
"""

from __future__ import annotations

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_identity_folder
from PIL import Image

from jaxdesens.config import TrainConfig
from jaxdesens.data import IdentitySet, make_synthetic
from jaxdesens.data.synthetic import SyntheticConfig
from jaxdesens.recognizer import Recognizer, load_recognizer
from jaxdesens.state import build_model, create_train_state, lr_schedule
from jaxdesens.train import MaskSource, mask_source_for, train_and_evaluate, train_step

SIZE = 16


def hidden_share(mask: np.ndarray) -> float:
    """The reference ratio: hidden pixels counted, not averaged."""
    mask = np.asarray(mask)
    return np.count_nonzero(mask == 0) / mask.size


def face_mask() -> np.ndarray:
    """Hides 12 x 14 of 16 x 16 pixels (65.6%), far from 50% so an inverted ratio cannot pass."""
    mask = np.ones((SIZE, SIZE), np.float32)
    mask[2:14, 1:15] = 0
    return mask


def initial_state(config: TrainConfig, classes: int = 5, seed: int = 0, size: int = SIZE):
    """A fresh train state (jitted: eager initialisation of a ResNet is slow on CPU)."""
    net = build_model(config, classes)
    return net, jax.jit(lambda key: create_train_state(config, net, key, (size, size, 3)))(jax.random.key(seed))


def random_recognizer(model: str, seed: int = 0) -> Recognizer:
    config = TrainConfig(model=model, width=0.125, image_size=SIZE)
    net, state = initial_state(config, seed=seed)
    # Random BatchNorm statistics, so the network is not close to scale-invariant in its input.
    stats = jax.tree.map(lambda x: x + 0.1 * jax.random.uniform(jax.random.key(seed + 1), x.shape), state.batch_stats)
    return Recognizer(net, {"params": state.params, "batch_stats": stats}, config)


def faces(n: int = 8, seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


# ------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("model", ["mask", "fsm"])
def test_train_step_loss_is_cross_entropy_of_the_masked_forward_pass(model):
    # 32 px: layer3's 2 x 2 map lets the FSM gate vary over the face (at 16 px it is one uniform
    # scale that the next BatchNorm removes, so a step without the FSM mask would look the same).
    size = 32
    config = TrainConfig(model=model, width=0.125, image_size=size, lr=0.1)
    net, state = initial_state(config, size=size)
    batch = {"image": faces(size=size), "label": np.arange(8, dtype=np.int32) % 5}
    mask = np.ones((size, size), np.float32)
    mask[4:28, 2:20] = 0  # the left and middle of the face
    step = jax.jit(functools.partial(train_step, use_fsm=model == "fsm", schedule=lr_schedule(config)))
    _, metrics = step(state, batch, MaskSource(fixed=jnp.asarray(mask)), jax.random.key(1))
    forward = jax.jit(functools.partial(net.apply, train=True, mutable=["batch_stats"]))

    def cross_entropy(images, fsm_mask):
        (logits, _), _ = forward({"params": state.params, "batch_stats": state.batch_stats}, images, fsm_mask)
        log_p = jax.nn.log_softmax(np.asarray(logits, np.float64))
        return -float(np.mean(np.asarray(log_p)[np.arange(8), batch["label"]]))

    x = batch["image"].astype(np.float32) / 255.0
    fsm_mask = mask[None, :, :, None] if model == "fsm" else None
    expected = cross_entropy(x * mask[None, :, :, None], fsm_mask)  # x * m by hand
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    # each input matters, so the check can fail: the pixels, and for resnet-fsm the FSM's mask
    assert abs(cross_entropy(x, fsm_mask) - expected) > 1e-3
    if model == "fsm":
        assert abs(cross_entropy(x * mask[None, :, :, None], None) - expected) > 1e-3


@pytest.fixture(scope="module")
def hidden_pixel_runs(tmp_path_factory):
    """Two identity folders that differ only in the pixels `face_mask` hides, and 2-step trainings:
    resnet-mask on each, and a clean resnet on the first."""
    root = tmp_path_factory.mktemp("hidden_pixels")
    mask = face_mask()
    np.save(root / "mask.npy", mask)
    first = write_identity_folder(root / "a", identities=8, per_identity=4, size=SIZE, suffixes=(".png",))
    second = root / "b"
    shutil.copytree(first, second)
    rng = np.random.default_rng(1)
    for path in sorted(second.rglob("*.png")):
        pixels = np.asarray(Image.open(path).convert("RGB")).copy()
        pixels[mask == 0] = rng.integers(0, 256, (int((mask == 0).sum()), 3))
        Image.fromarray(pixels).save(path)
    base = dict(width=0.125, image_size=SIZE, batch_size=8, steps=2, lr=0.1, flip=False, holdout=0.375,
                log_every=1, checkpoint_every=2)
    runs = {}
    for name, model, data in (("mask_a", "mask", first), ("mask_b", "mask", second), ("clean_a", "resnet", first)):
        config = TrainConfig(model=model, data=str(data), mask=str(root / "mask.npy") if model == "mask" else None,
                             **base)
        runs[name] = train_and_evaluate(config, root / name, progress=False, log=lambda _: None)
    return {"root": root, "mask": mask, "runs": runs, "data": {"a": first, "b": second}}


def _leaves(result) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves((result.state.params, result.state.batch_stats))]


def test_training_under_a_mask_never_sees_the_hidden_pixels(hidden_pixel_runs):
    runs = hidden_pixel_runs["runs"]
    for x, y in zip(_leaves(runs["mask_a"]), _leaves(runs["mask_b"])):
        np.testing.assert_array_equal(x, y)
    # ... and a model trained under the mask differs from one trained on the same clean images
    assert max(float(np.abs(x - y).max()) for x, y in zip(_leaves(runs["mask_a"]), _leaves(runs["clean_a"]))) > 1e-4
    # the held-out verification under the run's mask sees no hidden pixel either
    assert runs["mask_a"].evaluation["masked"] == runs["mask_b"].evaluation["masked"]


def test_pipeline_situation_one_embeds_the_masked_test_faces(hidden_pixel_runs):
    from jaxdesens.data import load_dataset
    from jaxdesens.jobs.pipeline import situation_one
    from jaxdesens.metrics.verification import generate_pairs, verification_report

    root, mask = hidden_pixel_runs["root"], hidden_pixel_runs["mask"]
    test = load_dataset(hidden_pixel_runs["data"]["b"], SIZE)  # random noise in each face's hidden pixels
    recognizer = load_recognizer(root / "clean_a")
    forward = jax.jit(recognizer.model.apply)
    pairs = generate_pairs(test.labels, None, seed=0, n_folds=10)

    def accuracy(images: np.ndarray) -> float:
        embedding = np.asarray(forward(recognizer.variables, images)[1]["embedding"])
        return verification_report(embedding[pairs.left], embedding[pairs.right], pairs.issame, pairs.fold)["accuracy"]

    expected = accuracy(test.images / 255.0 * mask[None, :, :, None])
    assert situation_one(root / "clean_a", test, mask) == expected
    assert accuracy(test.images / 255.0) != expected  # unmasked, the noise shows: the check can fail


# ----------------------------------------------------------------------------------- embedding


@pytest.mark.parametrize("model", ["mask", "fsm"])
def test_embedding_under_a_mask_is_the_network_on_the_masked_images(model):
    recognizer = random_recognizer(model)
    images = faces()
    mask = face_mask()
    per_image = np.stack([np.roll(mask, k, axis=1) for k in range(len(images))])

    forward = jax.jit(recognizer.model.apply)

    def by_hand(masks: np.ndarray) -> np.ndarray:  # masks (N, H, W)
        x = images.astype(np.float32) / 255.0 * masks[..., None]
        fsm_mask = masks[..., None] if model == "fsm" else None
        return np.asarray(forward(recognizer.variables, x, fsm_mask)[1]["embedding"])

    shared = recognizer.embed(images, mask, batch_size=3)  # batches of 3: the last one padded
    np.testing.assert_allclose(shared, by_hand(np.broadcast_to(mask, per_image.shape)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(recognizer.embed(images, per_image, batch_size=3), by_hand(per_image),
                               rtol=1e-5, atol=1e-6)
    assert np.abs(recognizer.embed(images) - shared).max() > 1e-3  # the mask changes the embedding


# -------------------------------------------------------------------------------------- ratios


def test_training_log_reports_the_hidden_share(tmp_path):
    mask = face_mask()
    np.save(tmp_path / "mask.npy", mask)
    data = IdentitySet(faces(4), np.arange(4) % 2, ("a", "b"), "fp", "tiny")
    config = TrainConfig(model="mask", mask=str(tmp_path / "mask.npy"), image_size=SIZE)
    _, note = mask_source_for(config, data, jax.random.key(0))
    assert f"(ratio {hidden_share(mask):.3f})" in note
    export = IdentitySet(faces(4), np.arange(4) % 2, ("a", "b"), "fp", "tiny", mask=mask)
    _, note = mask_source_for(TrainConfig(model="fsm", image_size=SIZE), export, jax.random.key(0))
    assert f"(ratio {hidden_share(mask):.3f})" in note


def test_export_log_reports_the_hidden_share_before_and_after_resizing(tmp_path):
    from jaxdesens.desensitize.export import ExportJob, prepare_mask

    big = np.kron(face_mask(), np.ones((2, 2), np.float32))
    big[0, :] = 0  # one more hidden row, so the shares before and after resizing differ
    np.save(tmp_path / "mask.npy", big)
    messages: list[str] = []
    job = ExportJob(data="in", out="out", key="k", mask=str(tmp_path / "mask.npy"), image_size=SIZE)
    mask, size, _ = prepare_mask(job, messages.append)
    assert size == SIZE and f"ratio {hidden_share(big):.3f} -> {hidden_share(mask):.3f}" in messages[0]


def test_same_ratio_random_masks_are_chosen_by_hidden_share():
    from jaxdesens.jobs.search import same_ratio_random_masks
    from jaxdesens.masks import freeform

    for target in (0.15, 0.35):  # far from 0.5 on both sides, where an inverted ratio picks the mirror share
        masks = same_ratio_random_masks(target, (SIZE, SIZE), 4, seed=0, ranges=freeform.StrokeRanges())
        assert all(abs(hidden_share(m) - target) < 0.05 for m in masks), [hidden_share(m) for m in masks]


@pytest.mark.slow
def test_search_reports_hidden_shares_and_adapts_the_floor_to_the_template(hidden_pixel_runs, tmp_path):
    from jaxdesens.jobs.search import SearchJob, run_search_job
    from jaxdesens.masks import load_mask

    job = SearchJob(checkpoint=str(hidden_pixel_runs["root"] / "clean_a"), out=str(tmp_path / "search"), n=8, K=4,
                    T=0.6, batch_images=8, min_ratio=0.95, adapt_floor=True, random_repeats=2,
                    saliency_layer="layer1")  # layer3 of these small faces is one cell: no template
    summary = run_search_job(job, progress=False, log=lambda _: None)
    template = load_mask(tmp_path / "search" / "template.png")
    hideable = hidden_share(template)  # the most a candidate max(strokes, S) can hide
    assert hideable < 0.95 and summary["min_ratio"] == pytest.approx(0.9 * hideable)
    best = load_mask(tmp_path / "search" / "mask.png")
    assert summary["ratio"] == pytest.approx(hidden_share(best))
    for ratio in summary["verification"]["random_same_ratio_ratios"]:
        assert abs(ratio - summary["ratio"]) < 0.1


def test_pipeline_privacy_numbers_are_the_hidden_share_and_dssim(tmp_path):
    from skimage.metrics import structural_similarity

    from jaxdesens.jobs.pipeline import mask_privacy

    test = make_synthetic(SyntheticConfig(identities=2, images_per_identity=2, image_size=SIZE))
    mask = face_mask()
    privacy = mask_privacy(test, mask, attack_images=2)
    x = test.images.astype(np.float64) / 255.0
    reference = [1 - structural_similarity(a, a * mask[:, :, None], gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, data_range=1.0, channel_axis=-1) for a in x]
    assert privacy["ratio"] == pytest.approx(hidden_share(mask))
    assert privacy["dssim"] == pytest.approx(np.mean(reference), abs=1e-5)
