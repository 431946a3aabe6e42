"""Re-identification scores: desensitized probes against a clean gallery of the same people.

The attacker holds clean photos of candidate people (the gallery) and tries to name each
desensitized probe. Two numbers, each with its chance level:

- **rank-1 identification**: the share of probes whose most similar gallery identity is their own.
  Ties at the top are broken at random in expectation (a probe tied with k identities, one of
  them its own, counts 1/k), so an attacker whose embeddings carry no information scores exactly
  chance = 1 / (gallery identities), never more.
- **TAR at FAR**: genuine comparisons are a probe against the gallery entries of its own identity,
  impostor comparisons are a probe against the gallery entries of every *other* identity; the
  threshold accepts at most `far` of the impostor comparisons. An uninformative attacker's
  genuine scores look like impostor scores, so chance = `far`.

Probes are never compared with each other or with themselves: only probe x gallery.
"""

from __future__ import annotations

import numpy as np

from jaxdesens.metrics.verification import tar_at_far

METRICS = ("cosine", "euclidean")


def gallery_split(labels: np.ndarray, per_identity: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(gallery, probe) image indices: `per_identity` seeded picks per identity, the rest probes.

    The two index sets are disjoint. An identity with no image left over stays in the gallery
    (a distractor the attacker may confuse probes with) and has no probes.
    """
    labels = np.asarray(labels)
    if per_identity < 1:
        raise ValueError(f"gallery per_identity must be >= 1, got {per_identity}")
    rng = np.random.default_rng(seed)
    gallery = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        gallery.extend(np.sort(rng.choice(members, min(per_identity, len(members)), replace=False)))
    gallery = np.sort(np.asarray(gallery, np.int64))
    return gallery, np.setdiff1d(np.arange(len(labels)), gallery)


def similarity(probes: np.ndarray, gallery: np.ndarray, metric: str) -> np.ndarray:
    """(P, G) scores, higher = more alike: cosine similarity or negative Euclidean distance."""
    if metric not in METRICS:
        raise ValueError(f"unknown similarity metric {metric!r}; expected one of {METRICS}")
    p, g = np.asarray(probes, np.float64), np.asarray(gallery, np.float64)
    if p.ndim != 2 or g.ndim != 2 or p.shape[1] != g.shape[1]:
        raise ValueError(f"embeddings must be (P, D) and (G, D), got {p.shape} and {g.shape}")
    if metric == "cosine":
        p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        return p @ g.T
    squared = (p**2).sum(1)[:, None] + (g**2).sum(1)[None] - 2 * p @ g.T
    return -np.sqrt(np.maximum(squared, 0.0))


def _rank1(scores: np.ndarray, gallery_labels: np.ndarray, probe_labels: np.ndarray) -> float:
    """Expected rank-1 hit rate under random tie-breaking, over identities (best entry of each)."""
    identities = np.unique(gallery_labels)
    per_identity = np.stack([scores[:, gallery_labels == i].max(axis=1) for i in identities], axis=1)
    top = per_identity.max(axis=1, keepdims=True)
    tied = np.isclose(per_identity, top, rtol=0.0, atol=1e-9)
    own = probe_labels[:, None] == identities[None]
    return float(np.mean((tied & own).sum(axis=1) / tied.sum(axis=1)))


def identification_report(probe_embeddings: np.ndarray, probe_labels: np.ndarray, gallery_embeddings: np.ndarray,
                          gallery_labels: np.ndarray, metric: str, far: float = 1e-3) -> dict:
    """Rank-1 and TAR at `far` with their chance levels and the comparison counts, JSON-ready.

    `tar` is None when there are fewer than `1 / far` impostor comparisons (the threshold could
    not allow a single false accept). Every probe identity must be in the gallery.
    """
    probe_labels, gallery_labels = np.asarray(probe_labels), np.asarray(gallery_labels)
    missing = np.setdiff1d(probe_labels, gallery_labels)
    if missing.size:
        raise ValueError(f"probe identities {missing[:5].tolist()} have no gallery entry")
    if len(probe_labels) == 0:
        raise ValueError("no probes to identify")
    scores = similarity(probe_embeddings, gallery_embeddings, metric)
    genuine = probe_labels[:, None] == gallery_labels[None]
    identities = len(np.unique(gallery_labels))
    tar = tar_at_far(scores.ravel(), genuine.ravel(), far) if identities > 1 else None
    return {"rank1": _rank1(scores, gallery_labels, probe_labels), "rank1_chance": 1.0 / identities,
            "tar": tar, "tar_chance": far, "far": far, "probes": int(len(probe_labels)),
            "gallery_identities": int(identities), "genuine_comparisons": int(genuine.sum()),
            "impostor_comparisons": int((~genuine).sum())}
