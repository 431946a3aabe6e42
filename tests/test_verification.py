"""Verification protocol: k-fold accuracy, AUC, TAR@FAR, generated pairs, LFW pairs files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxdesens.data import lfw
from jaxdesens.data.errors import DataError
from jaxdesens.data.lfw import lfw_image_path, load_lfw_pairs, parse_pairs
from jaxdesens.metrics.verification import (
    combine_flip,
    cosine_scores,
    generate_pairs,
    kfold_accuracy,
    roc_auc,
    tar_at_far,
    verification_report,
)


def test_kfold_separable_scores_give_perfect_accuracy():
    rng = np.random.default_rng(0)
    issame = rng.random(600) < 0.5
    scores = np.where(issame, rng.uniform(0.5, 1.0, 600), rng.uniform(-1.0, 0.4, 600))
    result = kfold_accuracy(scores, issame, 10)
    assert result["mean"] == 1.0 and result["std"] == 0.0
    assert result["per_fold"].shape == (10,) and np.all((result["thresholds"] > 0.4) & (result["thresholds"] < 0.5))


def test_kfold_random_scores_are_near_chance():
    rng = np.random.default_rng(1)
    result = kfold_accuracy(rng.standard_normal(6000), rng.random(6000) < 0.5, 10)
    assert abs(result["mean"] - 0.5) < 0.04
    # Small folds expose a threshold that has seen the labels it is scored on: over 200 random
    # 40-pair problems the protocol averages 0.487 (measured); thresholds fitted on all folds
    # average 0.611, fitted on the scored fold itself 0.792.
    means = [kfold_accuracy(r.standard_normal(40), r.random(40) < 0.5, 10)["mean"]
             for r in map(np.random.default_rng, range(200))]
    assert np.mean(means) < 0.53


def test_kfold_threshold_of_a_fold_ignores_that_fold():
    rng = np.random.default_rng(3)
    fold = np.repeat(np.arange(5), 20)
    scores, issame = rng.standard_normal(100), rng.random(100) < 0.5
    thresholds = kfold_accuracy(scores, issame, fold)["thresholds"]
    for f in range(5):
        changed_scores, changed_issame = scores.copy(), issame.copy()
        changed_scores[fold == f] = rng.standard_normal(20) * 3
        changed_issame[fold == f] = ~issame[fold == f]
        again = kfold_accuracy(changed_scores, changed_issame, fold)["thresholds"]
        assert again[f] == thresholds[f]  # fold f's threshold comes from the other folds only
        assert not np.allclose(np.delete(again, f), np.delete(thresholds, f))  # the others do see fold f


def test_kfold_threshold_comes_from_the_other_folds():
    # Fold 0 alone separates at 0.3 | 0.45, but folds 1-2 (the training folds) force 0.5 | 0.9.
    fold = np.repeat([0, 1, 2], [4, 20, 20])
    issame = np.concatenate([[True, True, False, False], np.tile(np.repeat([True, False], 10), 2)])
    scores = np.concatenate([[0.45, 0.45, 0.3, 0.3], np.tile(np.repeat([0.9, 0.5], 10), 2)])
    result = kfold_accuracy(scores, issame, fold)
    np.testing.assert_allclose(result["thresholds"], [0.7, 0.7, 0.7])
    np.testing.assert_allclose(result["per_fold"], [0.5, 1.0, 1.0])
    own_threshold = (0.3 + 0.45) / 2  # what fitting on fold 0 itself would choose
    assert np.mean((scores[:4] > own_threshold) == issame[:4]) == 1.0


def test_kfold_generated_folds_are_deterministic_and_even():
    rng = np.random.default_rng(2)
    scores, issame = rng.random(103), rng.random(103) < 0.5
    a, b = kfold_accuracy(scores, issame, 10, seed=3), kfold_accuracy(scores, issame, 10, seed=3)
    np.testing.assert_array_equal(a["per_fold"], b["per_fold"])
    # 103 pairs in 10 folds: sizes 10 or 11, so every accuracy is a multiple of 1/10 or 1/11.
    assert all(min(abs(x * 10 - round(x * 10)), abs(x * 11 - round(x * 11))) < 1e-9 for x in a["per_fold"])


def test_roc_auc_matches_brute_force_with_ties():
    rng = np.random.default_rng(4)
    issame = rng.random(300) < 0.4
    scores = np.round(rng.standard_normal(300) + issame, 1)  # rounding makes many ties
    pos, neg = scores[issame][:, None], scores[~issame][None, :]
    brute = np.mean((pos > neg) + 0.5 * (pos == neg))
    assert roc_auc(scores, issame) == pytest.approx(brute, abs=1e-12)
    assert roc_auc(np.arange(4.0), [False, False, True, True]) == 1.0


def test_tar_at_far_hand_built():
    negatives = np.arange(100) / 100  # 0.00 .. 0.99: FAR 1% allows only 0.99 above the threshold 0.98
    positives = np.array([0.5, 0.985, 0.99, 1.0])
    scores = np.concatenate([negatives, positives])
    issame = np.concatenate([np.zeros(100, bool), np.ones(4, bool)])
    assert tar_at_far(scores, issame, 1e-2) == 0.75
    assert tar_at_far(scores, issame, 0.5) == 1.0  # threshold 0.49
    assert tar_at_far(scores[50:], issame[50:], 1e-2) is None  # 50 negatives cannot resolve 1%


def test_cosine_flip_and_report():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine_scores(a, b), [1.0, 0.0, 0.0])
    assert combine_flip(a, b).shape == (3, 2) and combine_flip(a, b, "concat").shape == (3, 4)
    rng = np.random.default_rng(5)
    issame = np.arange(200) % 2 == 0
    emb_a = rng.standard_normal((200, 8))
    emb_b = np.where(issame[:, None], emb_a + 0.1 * rng.standard_normal((200, 8)), rng.standard_normal((200, 8)))
    report = verification_report(emb_a, emb_b, issame, folds=10)
    assert report["pairs"] == 200 and report["accuracy"] > 0.95 and report["auc"] > 0.99
    assert report["tar_at_far_1e-2"] is not None and len(report["accuracy_per_fold"]) == 10


def _pair_set(left, right):
    return {tuple(sorted(p)) for p in zip(left.tolist(), right.tolist())}


def test_generate_pairs_balanced_unique_and_deterministic():
    labels = np.repeat(np.arange(30), np.arange(30) % 6 + 1)[::-1]  # 1..6 images, unsorted order
    pairs = generate_pairs(labels, 40, seed=7)
    assert len(pairs) == 80 and pairs.issame.sum() == 40
    assert np.all(pairs.left != pairs.right)
    assert len(_pair_set(pairs.left, pairs.right)) == 80
    np.testing.assert_array_equal(labels[pairs.left] == labels[pairs.right], pairs.issame)
    for f in range(10):
        assert pairs.issame[pairs.fold == f].sum() == 4 and (~pairs.issame[pairs.fold == f]).sum() == 4
    again, other = generate_pairs(labels, 40, seed=7), generate_pairs(labels, 40, seed=8)
    np.testing.assert_array_equal(pairs.left, again.left)
    np.testing.assert_array_equal(pairs.right, again.right)
    assert _pair_set(pairs.left, pairs.right) != _pair_set(other.left, other.right)


def test_generate_pairs_none_takes_every_matched_pair():
    labels = np.array([0, 1, 0, 2, 1, 0])  # matched pairs: 3 from identity 0, 1 from identity 1
    pairs = generate_pairs(labels, None, seed=0, n_folds=2)
    assert _pair_set(pairs.left[pairs.issame], pairs.right[pairs.issame]) == {(0, 2), (0, 5), (2, 5), (1, 4)}
    assert (~pairs.issame).sum() == 4
    assert np.all(labels[pairs.left[~pairs.issame]] != labels[pairs.right[~pairs.issame]])


def test_generate_pairs_errors_name_single_image_identities():
    with pytest.raises(DataError, match="single image: ann, bob, cy"):
        generate_pairs(np.array([0, 1, 2]), 5, seed=0, names=["ann", "bob", "cy"])
    with pytest.raises(DataError, match="allow only 1 matched"):
        generate_pairs(np.array([0, 0, 1]), 5, seed=0)


# --- LFW pairs.txt ---------------------------------------------------------------------------

def test_parse_real_lfw_pairs(lfw_pairs_path):
    pairs = parse_pairs(lfw_pairs_path)
    assert len(pairs) == 6000 and pairs.num_folds == 10 and pairs.issame.sum() == 3000
    for f in range(10):
        in_fold = pairs.fold == f
        assert pairs.issame[in_fold].sum() == 300 and (~pairs.issame[in_fold]).sum() == 300
    assert np.all(pairs.left_name[pairs.issame] == pairs.right_name[pairs.issame])
    assert pairs.left_index.min() >= 1 and pairs.right_index.min() >= 1
    first = Path(lfw_pairs_path).read_text().splitlines()[1].split()
    assert [pairs.left_name[0], str(pairs.left_index[0]), str(pairs.right_index[0])] == first
    assert pairs.line[0] == 2 and pairs.line[-1] == 6001


GOOD = ["2\t2", "A\t1\t2", "B\t1\t3", "A\t1\tB\t2", "B\t3\tA\t2",
        "C\t1\t2", "A\t2\t3", "C\t1\tA\t1", "B\t2\tC\t2"]


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parse_small_file_and_view1_header(tmp_path):
    pairs = parse_pairs(_write(tmp_path, GOOD))
    np.testing.assert_array_equal(pairs.issame, [True, True, False, False] * 2)
    np.testing.assert_array_equal(pairs.fold, [0] * 4 + [1] * 4)
    assert pairs.right_name[2] == "B" and pairs.right_index[3] == 2
    view1 = parse_pairs(_write(tmp_path, ["2"] + GOOD[1:5]))
    assert len(view1) == 4 and view1.num_folds == 1


@pytest.mark.parametrize("line_no, replacement, expected", [
    (5, "B\t3\t2", r":5: fold 1 mismatched section expects .* got 3 field\(s\) \(a matched line\)"),
    (2, "A\t1\tB\t2", r":2: fold 1 matched section expects .* \(a mismatched line\)"),
    (3, "B\tone\t3", r":3: expected a 1-based image number .* 'one'"),
    (7, "A\t0\t3", r":7: expected a 1-based image number .* '0'"),
    (1, "ten\t2", r":1: expected a header"),
])
def test_parse_rejects_malformed_lines(tmp_path, line_no, replacement, expected):
    lines = list(GOOD)
    lines[line_no - 1] = replacement
    with pytest.raises(DataError, match=expected) as info:
        parse_pairs(_write(tmp_path, lines))
    assert str(tmp_path / "pairs.txt") in str(info.value)


def test_parse_rejects_wrong_line_count(tmp_path):
    with pytest.raises(DataError, match=r":8: header announces 2 fold\(s\) .* 8 pair lines, but the file has 6"):
        parse_pairs(_write(tmp_path, GOOD[:-2]))
    with pytest.raises(DataError, match=r":10: .* but the file has 9"):
        parse_pairs(_write(tmp_path, GOOD + ["A\t1\t3"]))


def _colour(name: str, index: int) -> np.ndarray:
    return np.frombuffer(np.random.default_rng([index, *name.encode()]).bytes(3), np.uint8)


def _lfw_subset(tmp_path: Path, lfw_pairs_path: Path) -> tuple[Path, Path]:
    """A 1-fold pairs file from the real file's first matched and mismatched lines, with stand-in images."""
    real = Path(lfw_pairs_path).read_text().splitlines()
    path = _write(tmp_path, ["1\t10"] + real[1:11] + real[301:311])
    root = tmp_path / "lfw"
    parsed = parse_pairs(path)
    for name, index in set(zip(parsed.left_name, parsed.left_index)) | set(zip(parsed.right_name, parsed.right_index)):
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.broadcast_to(_colour(name, index), (12, 12, 3)).copy()).save(
            root / name / f"{name}_{index:04d}.jpg", quality=95)
    return path, root


def test_load_lfw_pairs_with_stand_in_images(tmp_path, lfw_pairs_path, monkeypatch):
    path, root = _lfw_subset(tmp_path, lfw_pairs_path)
    png = lfw_image_path(root, "Abel_Pacheco", 4)
    Image.open(png).save(png.with_suffix(".png"))
    png.unlink()
    assert lfw_image_path(root, "Abel_Pacheco", 4) == png.with_suffix(".png")
    decoded, original = [], lfw.load_images
    monkeypatch.setattr(lfw, "load_images", lambda paths, *args: decoded.extend(paths) or original(paths, *args))
    left, right, pairs = load_lfw_pairs(path, root, image_size=8)
    assert left.shape == right.shape == (20, 8, 8, 3) and left.dtype == np.uint8
    assert len(decoded) == len(set(decoded)) == len(set(zip(pairs.left_name, pairs.left_index))
                                                    | set(zip(pairs.right_name, pairs.right_index)))
    for k in range(20):
        for images, names, indices in ((left, pairs.left_name, pairs.left_index),
                                       (right, pairs.right_name, pairs.right_index)):
            diff = np.abs(images[k].astype(int) - _colour(names[k], indices[k]))
            assert diff.max() <= 3


def test_load_lfw_pairs_missing_image_names_path_and_line(tmp_path, lfw_pairs_path):
    path, root = _lfw_subset(tmp_path, lfw_pairs_path)
    pairs = parse_pairs(path)
    key = (pairs.right_name[12], pairs.right_index[12])
    lfw_image_path(root, *key).unlink()
    uses = [line for k, line in enumerate(pairs.line)
            if key in ((pairs.left_name[k], pairs.left_index[k]), (pairs.right_name[k], pairs.right_index[k]))]
    with pytest.raises(DataError, match="image missing") as info:
        load_lfw_pairs(path, root, image_size=8)
    assert str(lfw_image_path(root, *key)) in str(info.value) and f"{path}:{min(uses)};" in str(info.value)
