"""Held-out verification of a recognizer, the measurement every training run ends with."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxdesens.data import IdentitySet
from jaxdesens.metrics.verification import generate_pairs, verification_report
from jaxdesens.recognizer import Recognizer

EVAL_MASK_SEED = 1234  # the random level masks of a masked evaluation do not depend on the run seed


def pair_accuracy(recognizer: Recognizer, images: np.ndarray, pairs, mask: np.ndarray | None = None,
                  query_mask: np.ndarray | None | str = "same", flip: bool = False,
                  batch_size: int = 128) -> dict[str, Any]:
    """Verification of generated pairs; `mask` applies to the gallery (right) image of each pair
    and, unless `query_mask` says otherwise, to the query (left) image too."""
    gallery = recognizer.embed(images, mask, batch_size=batch_size, flip=flip)
    query = (gallery if isinstance(query_mask, str)
             else recognizer.embed(images, query_mask, batch_size=batch_size, flip=flip))
    return verification_report(query[pairs.left], gallery[pairs.right], pairs.issame, pairs.fold)


def held_out_verification(recognizer: Recognizer, held_out: IdentitySet, masks, seed: int = 0,
                          premasked: bool = False, batch_size: int = 128) -> dict[str, Any]:
    """10-fold cosine verification on identities never seen in training: clean images, and
    (when the run trained on masks) both images under the run's masks (Situation 1).

    `premasked` images (a desensitized export) have no clean version, so only "masked" is reported.
    """
    pairs = generate_pairs(held_out.labels, None, seed=seed, n_folds=10)
    result: dict[str, Any] = {"pairs": int(len(pairs.issame)), "identities": held_out.num_classes}
    if not premasked:
        result["clean"] = pair_accuracy(recognizer, held_out.images, pairs, batch_size=batch_size)
    mask = masks.sample(jax.random.key(EVAL_MASK_SEED), len(held_out)) if masks is not None else None
    if mask is not None:
        result["masked"] = pair_accuracy(recognizer, held_out.images, pairs, np.asarray(mask), batch_size=batch_size)
    return result


def format_evaluation(evaluation: dict[str, Any]) -> str:
    lines = [f"held-out verification ({evaluation['identities']} identities, {evaluation['pairs']} pairs, 10 folds):"]
    for name in ("clean", "masked"):
        if name in evaluation:
            r = evaluation[name]
            lines.append(f"  {name:>6}: accuracy {r['accuracy']:.4f} +- {r['accuracy_std']:.4f}, AUC {r['auc']:.4f}")
    return "\n".join(lines)
