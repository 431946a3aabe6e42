"""Re-identification scoring and the audit's plumbing, checked with attackers that need no model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxdesens.privacy import (
    Condition,
    PixelAttacker,
    audit_markdown,
    gallery_split,
    identification_report,
    privacy_utility_figure,
    reidentification_audit,
    similarity,
    worst_case,
)


def _brute_force(probes, probe_labels, gallery, gallery_labels, far):
    """Rank-1 and TAR@FAR written out pair by pair, independently of `reid` (Euclidean distance)."""
    hits = 0.0
    genuine, impostor = [], []
    for p, label in zip(probes, probe_labels):
        distances = [float(np.linalg.norm(p - g)) for g in gallery]
        best = min(distances)
        tied = {int(gallery_labels[i]) for i, d in enumerate(distances) if abs(d - best) <= 1e-9}
        hits += (int(label) in tied) / len(tied)
        for d, g_label in zip(distances, gallery_labels):
            (genuine if g_label == label else impostor).append(-d)
    allowed = int(np.floor(far * len(impostor)))
    threshold = sorted(impostor, reverse=True)[allowed]
    accepted_impostors = sum(s > threshold for s in impostor)
    assert accepted_impostors <= allowed
    return hits / len(probes), sum(s > threshold for s in genuine) / len(genuine)


def test_report_matches_a_pair_by_pair_count():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(25, 8))
    gallery_labels = np.arange(25)
    gallery = centres + 0.3 * rng.normal(size=centres.shape)
    probe_labels = rng.integers(0, 25, 120)
    probes = centres[probe_labels] + 0.9 * rng.normal(size=(120, 8))
    report = identification_report(probes, probe_labels, gallery, gallery_labels, "euclidean", far=1e-3)
    rank1, tar = _brute_force(probes, probe_labels, gallery, gallery_labels, 1e-3)
    assert 0.2 < rank1 < 0.95  # an informative but imperfect attacker: both branches of the count matter
    assert report["rank1"] == pytest.approx(rank1)
    assert report["tar"] == pytest.approx(tar)
    assert report["impostor_comparisons"] == 120 * 24 and report["genuine_comparisons"] == 120
    assert report["rank1_chance"] == pytest.approx(1 / 25) and report["tar_chance"] == 1e-3


def test_cosine_similarity_and_distance_orders():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(similarity(a, b, "cosine"), [[1.0, np.sqrt(0.5)], [0.0, np.sqrt(0.5)]])
    np.testing.assert_allclose(similarity(a, b, "euclidean"), [[-1.0, -1.0], [-np.sqrt(8), -np.sqrt(2)]])
    with pytest.raises(ValueError, match="metric"):
        similarity(a, b, "dot")


def test_identical_probes_score_exactly_chance():
    """Fully hidden faces all embed alike: every identity ties, so rank-1 is 1/G (not the first
    gallery identity's share of the probes) and no genuine comparison beats an impostor."""
    gallery = np.random.default_rng(1).normal(size=(40, 4))
    probe_labels = np.repeat(np.arange(40), 3)[:100]  # unbalanced: identity 0 has 3 probes, 39 has 1
    report = identification_report(np.zeros((100, 4)), probe_labels, gallery, np.arange(40), "cosine", 1e-3)
    assert report["rank1"] == pytest.approx(1 / 40)
    assert report["tar"] == 0.0


def test_gallery_split_is_disjoint_seeded_and_covers_every_identity():
    labels = np.repeat(np.arange(6), [1, 3, 4, 4, 5, 2])
    gallery, probes = gallery_split(labels, per_identity=1, seed=3)
    assert set(gallery).isdisjoint(probes) and len(gallery) + len(probes) == len(labels)
    assert sorted(labels[gallery]) == list(range(6))
    assert 0 not in labels[probes]  # a one-photo identity is a gallery distractor only
    np.testing.assert_array_equal(gallery, gallery_split(labels, 1, seed=3)[0])
    assert not np.array_equal(gallery, gallery_split(labels, 1, seed=4)[0])


def _identity_images(identities=12, per_identity=5, size=16, noise=0.15, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(size=(identities, size, size, 3))
    images = np.clip(np.repeat(base, per_identity, 0) + noise * rng.normal(size=(identities * per_identity, size,
                                                                                   size, 3)), 0, 1)
    return images.astype(np.float32), np.repeat(np.arange(identities), per_identity)


def _audit(images, labels, conditions_of, attackers=None):
    gallery, probes = gallery_split(labels, 1, seed=0)
    conditions = conditions_of(images[probes])
    return reidentification_audit(images[gallery], labels[gallery], labels[probes], conditions,
                                  attackers or [PixelAttacker()])


def test_audit_names_clean_people_and_not_fully_hidden_ones():
    """The attacker must get the hidden probes, not the clean ones, and no labels: on fully hidden
    faces nothing beats chance (a leak of labels or clean pixels would give 100%)."""
    images, labels = _identity_images()
    hidden = np.zeros(images.shape[1:3], np.float32)
    audit = _audit(images, labels, lambda p: [Condition("clean", None, p),
                                              Condition("mask", "all", p * 0.0, mask=hidden, hidden=1.0)])
    rank1 = {r["condition"]: r["rank1"] for r in audit["results"]}
    assert rank1["clean"] == 1.0
    assert rank1["mask:all"] == pytest.approx(1 / 12)


def test_probes_are_never_compared_with_themselves():
    """Images with no identity signal at all (independent noise): only a probe matched with itself
    (or with its own copy in the gallery) could be named, so an honest audit stays near chance."""
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(40 * 5, 12, 12, 3)).astype(np.float32)
    labels = np.repeat(np.arange(40), 5)
    audit = _audit(images, labels, lambda p: [Condition("clean", None, p)])
    assert audit["results"][0]["rank1"] < 0.08  # chance 2.5% over 160 probes; self-matching gives 100%


class _Shuffled(PixelAttacker):
    """A second attacker that embeds probes as the gallery would not: it names the wrong people."""

    name = "shuffled"

    def embed_probes(self, images, mask=None):
        return super().embed_probes(images, mask)[::-1]


class _Recorder(PixelAttacker):
    """Records what the audit hands the attacker."""

    def __init__(self):
        self.seen = []

    def embed_gallery(self, images):
        self.seen.append(("gallery", np.array(images)))
        return super().embed_gallery(images)

    def embed_probes(self, images, mask=None):
        self.seen.append(("probes", np.array(images), mask))
        return super().embed_probes(images, mask)


def test_attackers_receive_only_desensitized_probes_and_the_mask():
    images, labels = _identity_images(identities=4, per_identity=3)
    mask = np.zeros(images.shape[1:3], np.float32)
    mask[:, :8] = 1
    recorder = _Recorder()
    _audit(images, labels, lambda p: [Condition("mask", "half", p * mask[..., None], mask=mask)], [recorder])
    (kind, gallery), (_, probes, given_mask) = recorder.seen
    assert kind == "gallery" and len(gallery) == 4 and len(probes) == 8
    assert np.all(probes[:, :, 8:] == 0) and np.array_equal(given_mask, mask)
    assert not any(np.array_equal(g, p) for g in gallery for p in probes)


def test_markdown_lists_skipped_attackers_with_their_reason_and_figure_points(tmp_path):
    images, labels = _identity_images()
    audit = _audit(images, labels, lambda p: [Condition("clean", None, p), Condition("blur", "3", p * 0.5),
                                              Condition("blur", "3", p * 0.0, restoration="learned"),
                                              Condition("mask", "x", p * 0.0), Condition("mask", "x", p, "learned")],
                   [PixelAttacker(), _Shuffled()])
    audit["skipped"] = {"dlib": "dlib is not installed; install the faces extra"}
    text = audit_markdown(audit)
    assert "**Attacker dlib skipped**: dlib is not installed" in text
    assert "| blur:3+learned |" in text
    utility = {"clean": 0.9, "blur:3": 0.8, "mask:x": {"accuracy": 0.7, "attackers": ["shuffled", "dlib"]}}
    points = privacy_utility_figure(audit, utility, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    by_name = {p["name"]: p for p in points}
    worst = max(r["rank1"] for r in audit["results"] if r["condition"].startswith("blur:3"))
    assert by_name["blur:3"]["reidentification"] == worst and by_name["blur:3"]["utility"] == 0.8
    named = [r["rank1"] for r in audit["results"]
             if r["condition"].startswith("mask:x") and r["attacker"] == "shuffled"]
    assert by_name["mask:x"]["reidentification"] == max(named) < worst_case(audit, "mask:x") == 1.0
    assert by_name["mask:x"]["attackers"] == ["shuffled"]  # dlib was skipped: left out, said so in the table
    with pytest.raises(ValueError, match="mosaic:9"):
        privacy_utility_figure(audit, {"mosaic:9": 0.5}, tmp_path / "g.png")
    with pytest.raises(ValueError, match="insider"):
        privacy_utility_figure(audit, {"clean": {"accuracy": 0.9, "attackers": ["insider"]}}, tmp_path / "g.png")
    json.dumps(audit)  # JSON-ready


def test_probe_cap_spreads_over_identities_and_keeps_probes_out_of_the_gallery():
    from jaxdesens.privacy.audit_job import probe_subset

    labels = np.repeat(np.arange(5), [6, 6, 2, 6, 1])
    gallery, probes = gallery_split(labels, 1, seed=0)
    chosen = probe_subset(labels, probes, total=7)
    # round-robin: the four people with probes get one each, then three get a second; never a gallery photo
    assert len(chosen) == 7 and sorted(np.bincount(labels[chosen], minlength=5).tolist()) == [0, 1, 2, 2, 2]
    assert not set(chosen) & set(gallery) and set(chosen) <= set(probes)
    assert np.array_equal(probe_subset(labels, probes), probes) and len(probe_subset(labels, probes, total=99)) == 16
    assert np.bincount(labels[probe_subset(labels, probes, per_identity=2)], minlength=5).tolist() == [2, 2, 1, 2, 0]


def test_an_attacker_that_found_no_face_in_the_gallery_is_flagged():
    class _Blind(PixelAttacker):
        name = "blind-dlib"

        def embed_gallery(self, images):
            self.notes = {"gallery_faces_detected": 0, "gallery_images": len(images)}
            return super().embed_gallery(images)

    images, labels = _identity_images()
    audit = _audit(images, labels, lambda p: [Condition("clean", None, p)], [PixelAttacker(), _Blind()])
    assert len(audit["warnings"]) == 1 and audit["warnings"][0].startswith("blind-dlib found a face in only 0 of")
    assert "**Warning**: blind-dlib found a face in only 0 of" in audit_markdown(audit)
