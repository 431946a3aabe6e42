"""The utility tables: verification of every model under the searched mask, Table 1 (random masks
per hole-ratio level), Table 2 (the Section 4.2 baseline) and Table 5 (the three situations).

A model's embeddings under a mask come from `Recognizer.embed` (pixels `x * m`, and the mask in an
FSM model's branch); accuracy is 10-fold verification of the evaluation set's pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdesens.data import IdentitySet
from jaxdesens.jobs.evaluate.sets import EvalSet
from jaxdesens.jobs.evaluate.settings import EvaluateJob
from jaxdesens.masks import LEVELS, make_level_bank, masks_at_level
from jaxdesens.masks.ops import apply_mask, mask_ratio
from jaxdesens.metrics.attacks import inpaint
from jaxdesens.metrics.verification import Pairs, verification_report
from jaxdesens.recognizer import Recognizer

ROLE_LABELS = {"resnet": "resnet", "mask": "resnet-mask", "fsm": "resnet-fsm"}


BASELINE_LEVELS = (4, 5)  # Section 4.2 searches levels (0.4, 0.5] and (0.5, 0.6]


_LEVEL_CHUNK = 4096  # images per level-bank call (bounds its rejection-sampling rounds)


def level_name(level: tuple[float, float]) -> str:
    return f"{level[0]:g}-{level[1]:g}"


@dataclasses.dataclass(frozen=True)
class Model:
    """A recognizer with the name its table columns carry."""

    label: str
    role: str  # resnet | mask | fsm
    recognizer: Recognizer
    workdir: str = ""


class Embedder:
    """Embeds images with one model; `mask` feeds an FSM branch (and is applied to the pixels)."""

    def __init__(self, flip: bool = False, batch_size: int = 128):
        self.flip = flip
        self.batch_size = batch_size

    def __call__(self, model: Model, images: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        return model.recognizer.embed(images, mask, batch_size=self.batch_size, flip=self.flip)


def brief(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "accuracy_std", "auc", "tar_at_far_1e-2", "pairs")
    return {k: report[k] for k in keys if k in report}


def pair_report(query: np.ndarray, gallery: np.ndarray, pairs: Pairs) -> dict[str, Any]:
    """Verification of pairs whose query (left) embeddings come from `query`, gallery from `gallery`."""
    return verification_report(query[pairs.left], gallery[pairs.right], pairs.issame, pairs.fold)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] float images -> uint8 (rounded), as the model's input pipeline stores them."""
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def role_labels(roles: Sequence[str], workdirs: Sequence[str]) -> list[str]:
    """"resnet" / "resnet-mask" / "resnet-fsm"; where two checkpoints share a role, their workdir names."""
    labels = []
    for role, workdir in zip(roles, workdirs):
        if sum(r == role for r in roles) > 1:
            labels.append(Path(workdir).resolve().name or str(workdir))
        else:
            labels.append(ROLE_LABELS[role])
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if labels.count(label) == 1 else f"{label}#{seen[label]}")
    return unique


def level_masks(key: jax.Array, n: int, height: int, width: int) -> np.ndarray:
    """(levels, n, H, W) uint8 masks, 1 = visible; `n` different masks per level, in its bucket."""
    parts = [make_level_bank(jax.random.fold_in(key, i), height, width, min(_LEVEL_CHUNK, n - start))
             for i, start in enumerate(range(0, n, _LEVEL_CHUNK))]
    return np.concatenate(parts, axis=1)


def table1_levels(models: Sequence[Model], evalset: EvalSet, embed: Embedder, clean: dict[str, dict],
                  repeats: int, seed: int, progress: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """Table 1: every model on test images under random masks of each hole-ratio level, a different
    mask per image and per repeat; returns the table and one example mask per level."""
    from tqdm.auto import tqdm

    n, height, width = evalset.images.shape[:3]
    runs: dict[int, dict[str, list[dict]]] = {lv: {m.label: [] for m in models} for lv in range(len(LEVELS))}
    ratios: dict[int, list[np.ndarray]] = {lv: [] for lv in range(len(LEVELS))}
    examples = np.ones((len(LEVELS), height, width), np.float32)
    bar = tqdm(total=repeats * len(LEVELS), disable=not progress, desc="Table 1 mask levels", unit="level")
    for repeat in range(repeats):
        bank = level_masks(jax.random.fold_in(jax.random.key(seed), repeat), n, height, width)
        for lv in range(len(LEVELS)):
            masks = bank[lv]
            ratios[lv].append(mask_ratio(masks))
            if repeat == 0:
                examples[lv] = masks[0]
            for model in models:
                emb = embed(model, evalset.images, masks)
                runs[lv][model.label].append(brief(pair_report(emb, emb, evalset.pairs)))
            bar.update(1)
    bar.close()
    rows = [{"level": "None", "range": None,
             "models": {m.label: {"mean": clean[m.label]["accuracy"], "std": 0.0, "runs": [clean[m.label]["accuracy"]],
                                  "fold_std": clean[m.label]["accuracy_std"], "auc": clean[m.label]["auc"]}
                        for m in models}}]
    for lv, level in enumerate(LEVELS):
        r = np.concatenate(ratios[lv])
        row = {"level": level_name(level), "range": list(level),
               "ratio_mean": float(r.mean()), "ratio_min": float(r.min()), "ratio_max": float(r.max()), "models": {}}
        for model in models:
            acc = np.array([x["accuracy"] for x in runs[lv][model.label]])
            model_runs = runs[lv][model.label]
            row["models"][model.label] = {"mean": float(acc.mean()), "std": float(acc.std()), "runs": acc.tolist(),
                                          "fold_std": float(np.mean([x["accuracy_std"] for x in model_runs])),
                                          "auc": float(np.mean([x["auc"] for x in model_runs]))}
        rows.append(row)
    clean_label = _first(models, "resnet")
    mask_label = _first(models, "mask")
    if clean_label and mask_label:
        for row in rows:
            row["delta"] = row["models"][mask_label]["mean"] - row["models"][clean_label]["mean"]
    return {"repeats": repeats, "rows": rows,
            "delta": [clean_label, mask_label] if clean_label and mask_label else None,
            "masks_per_image": "a different random mask per image and repeat"}, examples


def _first(models: Sequence[Model], role: str) -> str | None:
    return next((m.label for m in models if m.role == role), None)


def table2_baseline(models: Sequence[Model], evalset: EvalSet, embed: Embedder, train_set: IdentitySet,
                    job: EvaluateJob, progress: bool = False, log: Callable[[str], None] = print
                    ) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
    """Table 2 (Section 4.2): with the clean model, the best of `baseline_n` level-(0.4, 0.5] and
    level-(0.5, 0.6] masks by Formula 3 on its training identities; every model on test images
    under that mask and after inpainting them (`baseline_attack`)."""
    from tqdm.auto import tqdm

    from jaxdesens.jobs.search import balanced_sample, default_gamma
    from jaxdesens.models.functional import fold_batchnorm
    from jaxdesens.search import SearchConfig, auto_chunk, search_mask

    clean = next(m for m in models if m.role == "resnet")
    rng = np.random.default_rng(job.seed)
    score_idx = balanced_sample(train_set.labels, job.baseline_images, rng)
    images, labels = train_set.images[score_idx], train_set.labels[score_idx]
    height, width = images.shape[1:3]
    folded = fold_batchnorm(clean.recognizer.variables, clean.recognizer.config.depth)
    gamma = default_gamma(train_set.num_classes) if job.baseline_gamma is None else job.baseline_gamma
    chunk = min(job.baseline_n, auto_chunk(len(images), images.shape[1:], folded["stem"]["w"].shape[-1], 4))
    template = np.zeros((height, width), np.float32)
    rows, artifacts = [], []
    for lv in BASELINE_LEVELS:
        candidates = masks_at_level(jax.random.key(job.seed + 101 * (lv + 1)), lv, job.baseline_n, height, width)
        config = SearchConfig(n=job.baseline_n, gamma=gamma, min_ratio=0.0, batch_images=len(images), chunk=chunk,
                              seed=job.seed)
        bar = tqdm(total=job.baseline_n, disable=not progress, desc=f"Table 2 search {level_name(LEVELS[lv])}",
                   unit="mask")
        result = search_mask(folded, images, labels, template, config, candidates,
                             lambda done, rate: bar.update(done))
        bar.close()
        mask = result.best_mask
        masked = apply_mask(evalset.images.astype(np.float32) / 255.0, mask)
        restored = to_uint8(inpaint(masked, mask, job.baseline_attack, progress=progress))
        row = {"level": level_name(LEVELS[lv]), "candidates": job.baseline_n, "best_index": result.best_index,
               **{k: v for k, v in result.best().items()}, "ratio": float(mask_ratio(mask)), "models": {}}
        for model in models:
            masked_emb = embed(model, evalset.images, mask)
            restored_emb = embed(model, restored)
            row["models"][model.label] = {"masked": brief(pair_report(masked_emb, masked_emb, evalset.pairs)),
                                          "inpainted": brief(pair_report(restored_emb, restored_emb, evalset.pairs))}
        log(f"Table 2 level {row['level']}: best of {job.baseline_n} masks hides {row['ratio']:.1%}; "
            + ", ".join(f"{k} {v['masked']['accuracy']:.4f}/{v['inpainted']['accuracy']:.4f}"
                        for k, v in row["models"].items()) + " (masked/inpainted)")
        rows.append(row)
        artifacts.append({"mask": mask, "masked": masked[0], "restored": restored[0]})
    return {"clean_model": clean.label, "gamma": gamma, "attack": job.baseline_attack, "scoring_images": len(images),
            "rows": rows}, artifacts


def situations(models: Sequence[Model], evalset: EvalSet, clean: dict[str, np.ndarray],
               masked: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Table 5: Situation 1 both images masked, 2 query clean / gallery masked, 3 both clean."""
    p = evalset.pairs
    return {m.label: {"situation1": brief(pair_report(masked[m.label], masked[m.label], p)),
                      "situation2": brief(pair_report(clean[m.label], masked[m.label], p)),
                      "situation3": brief(pair_report(clean[m.label], clean[m.label], p))} for m in models}

