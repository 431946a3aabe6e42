"""What the models are tested on: evaluation sets (held-out identities, test identities, LFW
pairs), the pair subset the restoration attacks use, and the checks that checkpoints can share one set."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdesens.data import IdentitySet
from jaxdesens.metrics.verification import Pairs, generate_pairs


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Test images (uint8 NHWC) and verification pairs indexing them; left = query, right = gallery."""

    images: np.ndarray
    pairs: Pairs
    source: str
    kind: str  # "held-out identities" | "LFW pairs"
    identities: int

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "images": int(len(self.images)),
                "identities": int(self.identities), "pairs": int(len(self.pairs)),
                "matched": int(self.pairs.issame.sum()), "folds": int(len(np.unique(self.pairs.fold))),
                "image_shape": list(self.images.shape[1:])}


def identity_eval_set(held_out: IdentitySet, seed: int = 0) -> EvalSet:
    pairs = generate_pairs(held_out.labels, None, seed=seed, n_folds=10, names=held_out.names)
    return EvalSet(held_out.images, pairs, held_out.source, "held-out identities", held_out.num_classes)


def lfw_eval_set(pairs_path: str | Path, root: str | Path, image_size: int, channels: int) -> EvalSet:
    """LFW pairs with every named image decoded once; the pairs keep LFW's own 10 folds."""
    from jaxdesens.data.lfw import load_lfw_pairs

    left_images, right_images, lfw = load_lfw_pairs(pairs_path, root, image_size, channels)
    keys = list(zip(lfw.left_name.tolist(), lfw.left_index.tolist())) + \
        list(zip(lfw.right_name.tolist(), lfw.right_index.tolist()))
    slot: dict[tuple[str, int], int] = {}
    first: list[int] = []
    for position, key in enumerate(keys):
        if key not in slot:
            slot[key] = len(first)
            first.append(position)
    stacked = np.concatenate([left_images, right_images])
    index = np.array([slot[k] for k in keys]).reshape(2, -1)
    pairs = Pairs(index[0], index[1], lfw.issame.copy(), lfw.fold.copy())
    names = set(lfw.left_name.tolist()) | set(lfw.right_name.tolist())
    return EvalSet(stacked[np.asarray(first)], pairs, f"{pairs_path} (images under {root})", "LFW pairs", len(names))


def attack_subset(pairs: Pairs, n_images: int, cap: int, seed: int = 0) -> tuple[np.ndarray, Pairs]:
    """At most `cap` images (0 = all) and every pair among them, chosen deterministically.

    Pairs are taken in a seeded order alternating matched and mismatched, each kept if its images
    fit in the budget, so the subset stays balanced; returns image indices and remapped pairs.
    """
    if cap <= 0 or cap >= n_images:
        return np.arange(n_images), pairs
    rng = np.random.default_rng(seed)
    matched = rng.permutation(np.flatnonzero(pairs.issame))
    mismatched = rng.permutation(np.flatnonzero(~pairs.issame))
    order = np.empty(len(matched) + len(mismatched), np.int64)
    k = min(len(matched), len(mismatched))
    order[:2 * k:2], order[1:2 * k:2] = matched[:k], mismatched[:k]
    order[2 * k:] = np.concatenate([matched[k:], mismatched[k:]])
    chosen: set[int] = set()
    kept = []
    for p in order.tolist():
        need = {int(pairs.left[p]), int(pairs.right[p])} - chosen
        if len(chosen) + len(need) <= cap:
            chosen |= need
            kept.append(p)
    kept_arr = np.sort(np.asarray(kept, np.int64))
    indices = np.asarray(sorted(chosen), np.int64)
    lookup = np.full(n_images, -1, np.int64)
    lookup[indices] = np.arange(len(indices))
    sub = Pairs(lookup[pairs.left[kept_arr]], lookup[pairs.right[kept_arr]], pairs.issame[kept_arr],
                pairs.fold[kept_arr])
    if len(np.unique(sub.fold)) < 2 or sub.issame.all() or not sub.issame.any():
        raise ValueError(f"--attack_images={cap} leaves {len(kept_arr)} pairs, too few for verification "
                         "(need both matched and mismatched pairs in at least 2 folds); raise it or use 0 (all)")
    return indices, sub


def check_compatible(workdirs: Sequence[str], records: Sequence[dict[str, Any]], lfw: bool) -> None:
    """All checkpoints must take one input shape; on held-out identities they must share one split."""
    shapes = [(r["config"]["image_size"], r["config"].get("channels", 3)) for r in records]
    if len(set(shapes)) > 1:
        listing = ", ".join(f"{w}: {s}x{s}x{c}" for w, (s, c) in zip(workdirs, shapes))
        raise ValueError(f"the checkpoints take different input shapes ({listing}); evaluate models of one "
                         "--image_size and --channels together")
    if not lfw:
        splits = [(r["config"].get("holdout"), r["config"].get("split_seed")) for r in records]
        if len(set(splits)) > 1:
            listing = ", ".join(f"{w}: holdout {h}, split_seed {s}" for w, (h, s) in zip(workdirs, splits))
            raise ValueError(f"the checkpoints split identities differently ({listing}), so no identity set is "
                             "held out from all of them; use checkpoints of one split or LFW pairs")

