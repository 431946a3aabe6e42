"""Face verification: cosine scores, the LFW 10-fold accuracy protocol, AUC, TAR@FAR, pairs.

Pairs are "same" when their score is strictly above the threshold. Accuracy follows the standard
LFW protocol: the threshold for each fold is fitted on the other folds only, so the reported
number never sees the labels it is scored on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxdesens.data.errors import DataError

# With `n_pairs_per_class=None`, at most this many matched (and as many mismatched) pairs: the
# size of LFW View 2, so reports on identity folders are comparable to LFW in sampling noise.
DEFAULT_MAX_PAIRS_PER_CLASS = 3000


def _scores_and_labels(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64).ravel()
    issame = np.asarray(issame, bool).ravel()
    if scores.shape != issame.shape:
        raise ValueError(f"scores and issame differ in length: {scores.shape[0]} vs {issame.shape[0]}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    if issame.all() or not issame.any():
        raise ValueError("verification needs both matched and mismatched pairs")
    return scores, issame


def cosine_scores(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row pairs `(P, D) x (P, D) -> (P,)`; zero vectors score 0."""
    a = np.asarray(emb_a, np.float64)
    b = np.asarray(emb_b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"embeddings must both be (P, D), got {a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.einsum("pd,pd->p", a, b)


def combine_flip(emb: np.ndarray, emb_flipped: np.ndarray, mode: str = "sum") -> np.ndarray:
    """Merges embeddings of images and their mirrors (the usual test-time flip augmentation)."""
    if mode == "sum":
        return np.asarray(emb) + np.asarray(emb_flipped)
    if mode == "concat":
        return np.concatenate([emb, emb_flipped], axis=-1)
    raise ValueError(f"mode must be 'sum' or 'concat', got {mode!r}")


def _fold_ids(n_pairs: int, folds: np.ndarray | int, seed: int) -> np.ndarray:
    if np.ndim(folds) == 0:
        n_folds = int(folds)
        if not 2 <= n_folds <= n_pairs:
            raise ValueError(f"need 2 <= n_folds <= number of pairs ({n_pairs}), got {n_folds}")
        ids = np.empty(n_pairs, np.int64)
        ids[np.random.default_rng(seed).permutation(n_pairs)] = np.arange(n_pairs) * n_folds // n_pairs
        return ids
    folds = np.asarray(folds).ravel()
    if folds.shape != (n_pairs,):
        raise ValueError(f"folds must give one fold id per pair ({n_pairs}), got shape {folds.shape}")
    ids = np.unique(folds, return_inverse=True)[1]
    if ids.max() < 1:
        raise ValueError("k-fold accuracy needs at least 2 folds")
    return ids


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """The threshold with the highest accuracy on these pairs, searched exactly.

    Candidates are the midpoints between consecutive distinct scores plus one below and one above
    all of them, so the threshold depends only on these pairs; ties go to the lowest candidate.
    """
    values, rank = np.unique(scores, return_inverse=True)
    thresholds = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    # Candidate j calls exactly the scores values[j:] "same".
    negatives = np.bincount(rank[~issame], minlength=len(values))
    positives = np.bincount(rank[issame], minlength=len(values))
    correct = np.concatenate([[0], np.cumsum(negatives)]) + np.concatenate([np.cumsum(positives[::-1])[::-1], [0]])
    return float(thresholds[np.argmax(correct)])


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, folds: np.ndarray | int = 10,
                   seed: int = 0) -> dict:
    """LFW k-fold accuracy: each fold is scored with the best threshold of the other folds.

    `folds` is one fold id per pair (LFW's own folds) or a fold count, in which case pairs are
    shuffled with `seed` and cut into equal contiguous folds. `std` is the population standard
    deviation over folds, as in the usual LFW reports.
    """
    scores, issame = _scores_and_labels(scores, issame)
    fold = _fold_ids(len(scores), folds, seed)
    n_folds = int(fold.max()) + 1
    thresholds = np.array([best_threshold(scores[fold != f], issame[fold != f]) for f in range(n_folds)])
    correct = (scores > thresholds[fold]) == issame
    per_fold = np.bincount(fold, weights=correct, minlength=n_folds) / np.bincount(fold, minlength=n_folds)
    return {"mean": float(per_fold.mean()), "std": float(per_fold.std()), "per_fold": per_fold,
            "thresholds": thresholds}


def roc_auc(scores: np.ndarray, issame: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic; tied scores count one half."""
    scores, issame = _scores_and_labels(scores, issame)
    _, rank, ties = np.unique(scores, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(ties) - (ties - 1) / 2  # 1-based average rank of each distinct score
    n_pos = int(issame.sum())
    n_neg = len(scores) - n_pos
    u = mid_rank[rank][issame].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def tar_at_far(scores: np.ndarray, issame: np.ndarray, far: float = 1e-2) -> float | None:
    """True accept rate at the threshold that accepts at most `far` of the mismatched pairs.

    Returns None when there are fewer than `1 / far` mismatched pairs: then not even one false
    accept is allowed and the number would only say "below the largest impostor score".
    """
    if not 0 < far < 1:
        raise ValueError(f"far must be in (0, 1), got {far}")
    scores, issame = _scores_and_labels(scores, issame)
    negatives = np.sort(scores[~issame])[::-1]
    allowed = int(np.floor(far * len(negatives) + 1e-9))
    if allowed < 1:
        return None
    threshold = negatives[allowed]  # at most `allowed` impostors score strictly above it
    return float(np.mean(scores[issame] > threshold))


def verification_report(emb_a: np.ndarray, emb_b: np.ndarray, issame: np.ndarray,
                        folds: np.ndarray | int = 10) -> dict:
    """All verification numbers for one set of pair embeddings, as JSON-ready Python values."""
    scores = cosine_scores(emb_a, emb_b)
    accuracy = kfold_accuracy(scores, issame, folds)
    return {"accuracy": accuracy["mean"], "accuracy_std": accuracy["std"],
            "accuracy_per_fold": accuracy["per_fold"].tolist(), "thresholds": accuracy["thresholds"].tolist(),
            "auc": roc_auc(scores, issame), "tar_at_far_1e-2": tar_at_far(scores, issame, 1e-2),
            "pairs": len(scores)}


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Image-index pairs into a labelled set, laid out like LFW: per fold, matched then mismatched."""

    left: np.ndarray
    right: np.ndarray
    issame: np.ndarray
    fold: np.ndarray

    def __len__(self) -> int:
        return len(self.issame)


def _sample_ranges(lo: np.ndarray, hi: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draws `n` distinct (p, q) with `lo[p] <= q < hi[p]` uniformly, without listing all of them."""
    sizes = hi - lo
    ends = np.cumsum(sizes)
    flat = rng.choice(int(ends[-1]), size=n, replace=False)
    p = np.searchsorted(ends, flat, side="right")
    return p, lo[p] + flat - (ends[p] - sizes[p])


def generate_pairs(labels: np.ndarray, n_pairs_per_class: int | None, seed: int, n_folds: int = 10,
                   names: Sequence[str] | None = None) -> Pairs:
    """Verification pairs for an identity-labelled set: as many matched as mismatched pairs.

    `n_pairs_per_class` is the total number of matched pairs (and of mismatched pairs) over all
    folds; None takes every possible matched pair up to `DEFAULT_MAX_PAIRS_PER_CLASS`. Pairs are
    drawn uniformly without replacement among all distinct image pairs, so none repeats and no
    image is paired with itself; each fold gets the same number of each class (off by at most one).
    `names[label]` only makes error messages readable.
    """
    labels = np.asarray(labels).ravel()
    if n_pairs_per_class is not None and n_pairs_per_class < 1 or n_folds < 1:
        raise ValueError(f"need n_pairs_per_class >= 1 (or None) and n_folds >= 1, got {n_pairs_per_class}, {n_folds}")
    identities, counts = np.unique(labels, return_counts=True)
    if len(identities) < 2:
        raise DataError(f"verification pairs need at least 2 identities, got {len(identities)}")
    if counts.max() < 2:
        shown = [str(names[i]) if names is not None else str(i) for i in identities[:20].tolist()]
        more = f" and {len(identities) - 20} more" if len(identities) > 20 else ""
        raise DataError(f"matched pairs need an identity with at least 2 images, but all {len(identities)} "
                        f"identities have a single image: {', '.join(shown)}{more}")
    order = np.argsort(labels, kind="stable")
    end = np.repeat(np.cumsum(counts), counts)  # per sorted position: end of its identity block
    position = np.arange(len(labels))
    n_matched = int((counts * (counts - 1) // 2).sum())
    n_mismatched = int((len(labels) - end).sum())
    available = min(n_matched, n_mismatched)
    if n_pairs_per_class is None:
        n = min(available, DEFAULT_MAX_PAIRS_PER_CLASS)
    elif n_pairs_per_class > available:
        raise DataError(f"asked for {n_pairs_per_class} pairs per class, but the {len(identities)} identities "
                        f"allow only {n_matched} matched and {n_mismatched} mismatched pairs")
    else:
        n = n_pairs_per_class
    rng = np.random.default_rng(seed)
    same = _sample_ranges(position + 1, end, n, rng)
    diff = _sample_ranges(end, np.full_like(end, len(labels)), n, rng)
    shuffled = [(order[p][perm], order[q][perm]) for (p, q), perm in
                ((same, rng.permutation(n)), (diff, rng.permutation(n)))]
    left = np.concatenate([shuffled[0][0], shuffled[1][0]])
    right = np.concatenate([shuffled[0][1], shuffled[1][1]])
    issame = np.repeat([True, False], n)
    fold = np.tile(np.arange(n) % n_folds, 2)
    layout = np.lexsort((~issame, fold))
    return Pairs(left[layout], right[layout], issame[layout], fold[layout].astype(np.int32))
