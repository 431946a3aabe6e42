"""Deterministic splits: identity-disjoint (for verification) and per-identity (for classification)."""

from __future__ import annotations

import numpy as np

from jaxdesens.data.errors import DataError
from jaxdesens.data.identity import IdentitySet


def held_out_indices(n: int, holdout: float | int, seed: int = 0,
                     source: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) identity indices out of `n` sorted identities, both sorted.

    `holdout` is a fraction of identities (0 < holdout < 1) or a count (>= 1). The choice depends
    only on the number of identities and the seed, so the same folder always splits the same way.
    """
    count = int(round(holdout * n)) if 0 < holdout < 1 else int(holdout)
    if not 1 <= count < n:
        raise DataError(f"{source}: cannot hold out {holdout} of {n} identities; "
                        "need at least one identity on each side")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[count:]), np.sort(order[:count])


def split_identities(dataset: IdentitySet, holdout: float | int, seed: int = 0) -> tuple[IdentitySet, IdentitySet]:
    """Splits into (train, held-out) sets with no identity in both; each relabelled 0..k-1."""
    kept, held = held_out_indices(dataset.num_classes, holdout, seed, dataset.source)
    return dataset.subset(kept), dataset.subset(held)


def split_per_identity(dataset: IdentitySet, per_identity: int, seed: int = 0) -> tuple[IdentitySet, IdentitySet]:
    """Moves `per_identity` images of every identity (that has more) into a second set, same labels."""
    rng = np.random.default_rng(seed)
    second = []
    for label in range(dataset.num_classes):
        members = np.flatnonzero(dataset.labels == label)
        if len(members) > per_identity:
            second.extend(rng.choice(members, per_identity, replace=False))
    second = np.sort(np.asarray(second, np.int64))
    first = np.setdiff1d(np.arange(len(dataset)), second)
    return dataset.take(first), dataset.take(second)
