"""The evaluation job: checkpoints + test pairs + the searched mask -> the paper's Tables 1-5.

Utility is face verification (cosine, 10 folds) of every model under each desensitization;
privacy is image quality (dSSIM, PSNR) of the desensitized and the restored images. The test
pairs are the held-out identities of the checkpoints' own split (identity-disjoint from
training), or LFW pairs. Output folder:

  results.json   every number, the settings, the command line, device and versions
  report.md      one Markdown table per paper table, with the paper's numbers beside ours
  examples.png   original / masked / blur / mosaic / restored test faces (Figs. 5 and 7)
  levels.png     one random mask per hole-ratio level and a face under it (Fig. 4)
  baseline.png   the Section 4.2 baseline masks, a face under them and its inpainting (Fig. 5)

A model's role comes from its run.json (`model` = resnet / mask / fsm). An FSM model embeds a
masked image with its FSM branch fed the same mask, and a clean (or restored, blurred,
pixelated) image with no mask, which is exactly its plain backbone (FS = 1).
"""

from __future__ import annotations

import dataclasses
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdesens import figures
from jaxdesens.data import DataError, IdentitySet
from jaxdesens.masks import LEVELS, load_mask, make_level_bank, masks_at_level
from jaxdesens.metrics.attacks import ATTACK_METHODS, inpaint, restoration_report
from jaxdesens.metrics.verification import Pairs, generate_pairs, verification_report
from jaxdesens.paths import check_output_folder
from jaxdesens.recognizer import Recognizer

ROLE_LABELS = {"resnet": "resnet", "mask": "resnet-mask", "fsm": "resnet-fsm"}
BASELINE_LEVELS = (4, 5)  # Section 4.2 searches levels (0.4, 0.5] and (0.5, 0.6]
_QUALITY_BATCH = 256
_LEVEL_CHUNK = 4096  # images per level-bank call (bounds its rejection-sampling rounds)

# The paper's numbers (LFW, ResNet-34 trained on VGGFace2, RFR-Net inpainting), in percent.
PAPER = {
    "table1": {"None": (93.2, 92.13, -1.07), "0.01-0.1": (90.3, 91.89, 1.59), "0.1-0.2": (83.71, 91.32, 7.61),
               "0.2-0.3": (73.54, 90.49, 16.95), "0.3-0.4": (62.08, 89.53, 27.45),
               "0.4-0.5": (56.03, 87.76, 31.73), "0.5-0.6": (53.63, 83.62, 29.99)},
    # level -> (resnet masked, resnet inpainted, resnet-mask masked, resnet-mask inpainted, ratio)
    "table2": {"0.4-0.5": (78.02, 89.9, 90.23, 88.58, 42.35), "0.5-0.6": (63.57, 78.82, 85.82, 81.57, 50.94)},
    "table3": {"resnet": 53.92, "resnet-mask": 79.78, "resnet-fsm": 89.12, "ratio": 76.03},
    # Table 4's body is missing from the paper's text; its prose gives the mask's dSSIM 0.81 (Table 8,
    # T = 0.5) and "improves the dSSIM value by 0.52 and 0.39" over blurring and mosaic.
    "table4_dssim": {"mask": 0.81, "blur": round(0.81 - 0.52, 2), "mosaic": round(0.81 - 0.39, 2)},
    "table5": {"resnet-fsm": (89.12, 89.37, 91.35)},
    "table7": {1: 87.36, 2: 88.73, 3: 89.12, 4: 88.92},
}


def level_name(level: tuple[float, float]) -> str:
    return f"{level[0]:g}-{level[1]:g}"


@dataclasses.dataclass(frozen=True)
class EvaluateJob:
    checkpoints: tuple[str, ...] = ()
    mask: str = ""
    out: str = ""
    data: str | None = None
    lfw_pairs: str | None = None
    lfw_root: str | None = None
    test_data: str | None = None
    flip: bool = False
    repeats: int = 5
    baseline_n: int = 200
    baseline_images: int = 32
    baseline_gamma: float | None = None
    baseline_attack: str = "telea"
    attacks: str = "all"
    attack_images: int = 100
    examples: int = 4
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self):
        checkpoints = self.checkpoints
        if checkpoints is None:
            checkpoints = ()
        elif isinstance(checkpoints, (str, Path)):
            checkpoints = (checkpoints,)
        object.__setattr__(self, "checkpoints", tuple(str(c) for c in checkpoints))
        if (self.lfw_pairs is None) != (self.lfw_root is None):
            raise ValueError("--lfw_pairs and --lfw_root go together (the pairs file and the image root)")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.baseline_n < 0:
            raise ValueError(f"--baseline_n must be >= 0 (0 skips Table 2), got {self.baseline_n}")
        if self.baseline_images < 1:
            raise ValueError(f"--baseline_images must be >= 1, got {self.baseline_images}")
        if self.baseline_attack not in ATTACK_METHODS:
            raise ValueError(f"--baseline_attack must be one of {'|'.join(ATTACK_METHODS)}, "
                             f"got {self.baseline_attack!r}")
        if self.attack_images < 0:
            raise ValueError(f"--attack_images must be >= 0 (0 = every test image), got {self.attack_images}")
        if self.examples < 1 or self.batch_size < 1:
            raise ValueError(f"--examples and --batch_size must be >= 1, got {self.examples}, {self.batch_size}")
        parse_attacks(self.attacks)

    @property
    def attack_methods(self) -> tuple[str, ...]:
        return parse_attacks(self.attacks)


def parse_attacks(text: str) -> tuple[str, ...]:
    """`all`, `none` (or empty) or a comma list of `ATTACK_METHODS`, in the order given."""
    text = text.strip().lower()
    if text == "all":
        return ATTACK_METHODS
    if text in ("", "none"):
        return ()
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in methods if m not in ATTACK_METHODS]
    if bad:
        raise ValueError(f"--attacks: unknown method(s) {bad}; use 'all', 'none' or a comma list of "
                         f"{','.join(ATTACK_METHODS)}")
    return tuple(dict.fromkeys(methods))


@dataclasses.dataclass(frozen=True)
class Model:
    """A recognizer with the name its table columns carry."""

    label: str
    role: str  # resnet | mask | fsm
    recognizer: Recognizer
    workdir: str = ""


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


# ----------------------------------------------------------------------------------------------
# Verification primitives


def brief(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "accuracy_std", "auc", "tar_at_far_1e-2", "pairs")
    return {k: report[k] for k in keys if k in report}


def pair_report(query: np.ndarray, gallery: np.ndarray, pairs: Pairs) -> dict[str, Any]:
    """Verification of pairs whose query (left) embeddings come from `query`, gallery from `gallery`."""
    return verification_report(query[pairs.left], gallery[pairs.right], pairs.issame, pairs.fold)


class Embedder:
    """Embeds images with one model; `mask` feeds an FSM branch (and is applied to the pixels)."""

    def __init__(self, flip: bool = False, batch_size: int = 128):
        self.flip = flip
        self.batch_size = batch_size

    def __call__(self, model: Model, images: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        return model.recognizer.embed(images, mask, batch_size=self.batch_size, flip=self.flip)


def _to_uint8(images: np.ndarray) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------
# Sections


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
            ratios[lv].append(1.0 - masks.reshape(n, -1).mean(axis=1))
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
        masked = evalset.images.astype(np.float32) / 255.0 * mask[None, :, :, None]
        restored = _to_uint8(inpaint(masked, mask, job.baseline_attack, progress=progress))
        row = {"level": level_name(LEVELS[lv]), "candidates": job.baseline_n, "best_index": result.best_index,
               **{k: v for k, v in result.best().items()}, "ratio": float(1.0 - mask.mean()), "models": {}}
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


def _chunked_desensitize(images: np.ndarray, operator: Callable[[jax.Array], jax.Array],
                         batch: int = _QUALITY_BATCH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Desensitized uint8 images and per-image dSSIM and PSNR against the originals.

    Chunks of a fixed size (the last padded) so each operator compiles once."""
    from jaxdesens.metrics.quality import psnr, ssim

    n = len(images)
    batch = min(batch, n)
    out = np.empty_like(images)
    dssim_v, psnr_v = np.empty(n), np.empty(n)
    for start in range(0, n, batch):
        chunk = images[start:start + batch]
        valid = len(chunk)
        if valid < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - valid, axis=0)])
        x = chunk.astype(np.float32) / 255.0
        y = operator(x)
        dssim_v[start:start + valid] = 1.0 - np.asarray(ssim(x, y))[:valid]
        psnr_v[start:start + valid] = np.asarray(psnr(x, y))[:valid]
        out[start:start + valid] = _to_uint8(np.asarray(y))[:valid]
    return out, dssim_v, psnr_v


def desensitization_methods(mask: np.ndarray, image_size: int) -> list[dict[str, Any]]:
    from jaxdesens.desensitize import paper_sizes

    sizes = paper_sizes(image_size)
    methods = [{"method": "mask", "size": None, "label": f"mask (ratio {1 - mask.mean():.1%})"}]
    methods += [{"method": "blur", "size": k, "label": f"blur k={k}"} for k in sizes["blur"]]
    methods += [{"method": "mosaic", "size": b, "label": f"mosaic b={b}"} for b in sizes["mosaic"]]
    return methods


def table4_methods(models: Sequence[Model], evalset: EvalSet, embed: Embedder, mask: np.ndarray,
                   masked: dict[str, np.ndarray], progress: bool = False) -> dict[str, Any]:
    """Table 4: dSSIM and PSNR of each desensitization against the original, and every model's
    accuracy on test images desensitized that way (both images)."""
    import functools

    from tqdm.auto import tqdm

    from jaxdesens.desensitize import desensitize

    rows = []
    methods = desensitization_methods(mask, evalset.images.shape[1])
    for spec in tqdm(methods, disable=not progress, desc="Table 4 methods", unit="method"):
        operator = (functools.partial(desensitize, method="mask", mask=mask) if spec["method"] == "mask"
                    else functools.partial(desensitize, method=spec["method"], size=spec["size"]))
        images, dssim_v, psnr_v = _chunked_desensitize(evalset.images, operator)
        row = {**spec, "dssim_mean": float(dssim_v.mean()), "dssim_std": float(dssim_v.std()),
               "psnr_mean": float(psnr_v.mean()), "psnr_std": float(psnr_v.std()), "models": {}}
        for model in models:
            # The mask row is Situation 1: an FSM model gets the mask; blur and mosaic leave no hidden pixels.
            emb = masked[model.label] if spec["method"] == "mask" else embed(model, images)
            row["models"][model.label] = brief(pair_report(emb, emb, evalset.pairs))
        rows.append(row)
    return {"rows": rows, "ordering": dssim_ordering(rows)}


def dssim_ordering(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Does dSSIM(mask) > dSSIM(mosaic) > dSSIM(blur) hold, for the weak and for the strong sizes?"""
    value = {r["method"]: [] for r in rows}
    for r in rows:
        value[r["method"]].append(r["dssim_mean"])
    mask = value["mask"][0]
    result = {}
    for i, strength in enumerate(("weak", "strong")):
        mosaic, blur = value["mosaic"][i], value["blur"][i]
        result[strength] = {"mask": mask, "mosaic": mosaic, "blur": blur,
                            "mask_gt_mosaic": bool(mask > mosaic), "mosaic_gt_blur": bool(mosaic > blur),
                            "holds": bool(mask > mosaic > blur)}
    result["holds"] = all(result[s]["holds"] for s in ("weak", "strong"))
    return result


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


def restoration_attacks(models: Sequence[Model], evalset: EvalSet, embed: Embedder, mask: np.ndarray,
                        clean: dict[str, np.ndarray], masked: dict[str, np.ndarray], methods: Sequence[str],
                        cap: int, seed: int, progress: bool = False) -> dict[str, Any]:
    """Inpainting attacks on the searched mask: PSNR/SSIM of restored vs original next to the
    masked-vs-original baseline, and every model's accuracy on restored images (both images)."""
    indices, pairs = attack_subset(evalset.pairs, len(evalset.images), cap, seed)
    originals = evalset.images[indices].astype(np.float32) / 255.0
    masked_images = originals * mask[None, :, :, None]
    report = restoration_report(originals, masked_images, mask, tuple(methods), progress=progress)
    rows = [{"name": "clean (no desensitization)", "method": None, "psnr_mean": None, "ssim_mean": None,
             "models": {m.label: brief(pair_report(clean[m.label][indices], clean[m.label][indices], pairs))
                        for m in models}},
            {"name": "masked (no restoration)", "method": "masked", **report["baseline"],
             "models": {m.label: brief(pair_report(masked[m.label][indices], masked[m.label][indices], pairs))
                        for m in models}}]
    for method in methods:
        stats = dict(report["methods"][method])
        restored = stats.pop("restored")
        row = {"name": method, "method": method, **stats, "models": {}}
        for model in models:
            emb = embed(model, restored)
            row["models"][model.label] = brief(pair_report(emb, emb, pairs))
        rows.append(row)
    return {"images": int(len(indices)), "pairs": int(len(pairs)),
            "all_images": bool(len(indices) == len(evalset.images)), "methods": list(methods), "rows": rows}


# ----------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate_models(models: Sequence[Model], evalset: EvalSet, mask: np.ndarray, job: EvaluateJob,
                    train_set: IdentitySet | None = None, progress: bool = False,
                    log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every table; returns (JSON-ready results, in-memory artifacts for the figures)."""
    from tqdm.auto import tqdm

    embed = Embedder(job.flip, job.batch_size)
    seconds: dict[str, float] = {}
    notes: list[str] = []
    device = jax.devices()[0]
    results: dict[str, Any] = {
        "models": [], "data": evalset.describe(), "notes": notes, "seconds": seconds,
        "settings": {**dataclasses.asdict(job), "attack_methods": list(job.attack_methods)},
        "mask": {"path": job.mask, "ratio": float(1.0 - mask.mean())},
        "device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()},
        "versions": _versions()}
    artifacts: dict[str, Any] = {}

    t0 = time.perf_counter()
    clean, masked = {}, {}
    for model in tqdm(models, disable=not progress, desc="embedding clean / masked", unit="model"):
        clean[model.label] = embed(model, evalset.images)
        masked[model.label] = embed(model, evalset.images, mask)
    verification = {}
    for model in models:
        config = model.recognizer.config
        results["models"].append({"label": model.label, "role": model.role, "workdir": model.workdir,
                                  "depth": config.depth, "width": config.width, "steps": config.steps,
                                  "fsm_after": config.fsm_after if model.role == "fsm" else None,
                                  "trained_mask": config.mask})
        verification[model.label] = {"clean": pair_report(clean[model.label], clean[model.label], evalset.pairs),
                                     "masked": pair_report(masked[model.label], masked[model.label], evalset.pairs)}
        v = verification[model.label]
        log(f"{model.label}: clean {v['clean']['accuracy']:.4f} +- {v['clean']['accuracy_std']:.4f} "
            f"(AUC {v['clean']['auc']:.4f}), searched mask {v['masked']['accuracy']:.4f}")
    results["verification"] = verification
    seconds["verification"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results["table1"], artifacts["level_examples"] = table1_levels(
        models, evalset, embed, {k: v["clean"] for k, v in verification.items()}, job.repeats, job.seed, progress)
    seconds["table1"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if not any(m.role == "resnet" for m in models):
        results["table2"] = None
        notes.append("Table 2 skipped: the Section 4.2 baseline searches with a clean model (--model=resnet) "
                     "and none was given.")
    elif job.baseline_n == 0:
        results["table2"] = None
        notes.append("Table 2 skipped: --baseline_n=0.")
    elif train_set is None:
        results["table2"] = None
        notes.append("Table 2 skipped: the clean model's training data is not available.")
    else:
        results["table2"], artifacts["baseline"] = table2_baseline(models, evalset, embed, train_set, job, progress,
                                                                   log)
    seconds["table2"] = time.perf_counter() - t0

    ratio = float(1.0 - mask.mean())
    results["table3"] = {"ratio": ratio, "models": {m.label: brief(verification[m.label]["masked"]) for m in models}}
    results["table5"] = situations(models, evalset, clean, masked)
    fsm = [m for m in models if m.role == "fsm"]
    results["table7"] = [{"label": m.label, "fsm_after": m.recognizer.config.fsm_after,
                          "accuracy": results["table5"][m.label]["situation1"]["accuracy"]} for m in fsm]

    t0 = time.perf_counter()
    results["table4"] = table4_methods(models, evalset, embed, mask, masked, progress)
    seconds["table4"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    methods = job.attack_methods
    if methods:
        results["attacks"] = restoration_attacks(models, evalset, embed, mask, clean, masked, methods,
                                                 job.attack_images, job.seed, progress)
    else:
        results["attacks"] = None
        notes.append("Restoration attacks skipped: --attacks=none.")
    seconds["attacks"] = time.perf_counter() - t0
    return results, artifacts


def _example_indices(evalset: EvalSet, count: int) -> np.ndarray:
    count = min(count, len(evalset.images))
    return np.arange(count) * len(evalset.images) // count


def write_figures(out: Path, evalset: EvalSet, mask: np.ndarray, artifacts: dict[str, Any],
                  attacks: Sequence[str], count: int = 4) -> list[str]:
    """examples.png (Figs. 5, 7), levels.png (Fig. 4), baseline.png (Fig. 5); returns the file names."""
    from jaxdesens.desensitize import desensitize

    faces = evalset.images[_example_indices(evalset, count)].astype(np.float32) / 255.0
    columns = [("original", faces), ("masked", faces * mask[None, :, :, None])]
    for spec in desensitization_methods(mask, faces.shape[1])[1:]:
        columns.append((spec["label"], np.asarray(desensitize(faces, spec["method"], size=spec["size"]))))
    for method in attacks:
        columns.append((f"{method}", inpaint(columns[1][1], mask, method)))
    figures.save_grid(out / "examples.png", [[c[1][i] for c in columns] for i in range(len(faces))],
                      labels=[c[0] for c in columns])
    written = ["examples.png"]
    level_masks_ = artifacts.get("level_examples")
    if level_masks_ is not None:
        figures.save_grid(out / "levels.png", [list(level_masks_), [faces[0] * m[:, :, None] for m in level_masks_]],
                          labels=[level_name(level) for level in LEVELS])
        written.append("levels.png")
    if artifacts.get("baseline"):
        figures.save_grid(out / "baseline.png",
                          [[a["mask"], a["masked"], a["restored"]] for a in artifacts["baseline"]],
                          labels=["mask", "masked", "inpainted"])
        written.append("baseline.png")
    return written


# ----------------------------------------------------------------------------------------------
# The report


def _pct(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def render_report(results: dict[str, Any]) -> str:
    labels = [m["label"] for m in results["models"]]
    roles = {m["label"]: m["role"] for m in results["models"]}
    data = results["data"]
    lines = ["# Evaluation of utility and privacy", "",
             "All tables below were produced by this command:", "", "```",
             results.get("command") or "(not recorded)", "```", "",
             f"- test data: {data['kind']} of `{data['source']}`: {data['images']} images of {data['identities']} "
             f"identities, {data['pairs']} pairs ({data['matched']} matched) in {data['folds']} folds; "
             f"images {'x'.join(map(str, data['image_shape']))}",
             f"- searched mask: `{results['mask']['path']}`, hides {_pct(results['mask']['ratio'])} of the pixels",
             f"- flip-augmented embeddings: {results['settings']['flip']}; device: {results['device']['kind']} "
             f"({results['device']['platform']})",
             "- accuracy: 10-fold verification accuracy (threshold fitted on 9 folds), mean ± std over folds "
             "unless said otherwise; cosine similarity of pooled embeddings",
             "- paper numbers: ResNet-34 trained on VGGFace2, tested on LFW; ours come from the checkpoints "
             "above, so compare trends (orderings, gaps), not absolute values", ""]
    lines += ["## Models", ""]
    lines += _table(["label", "role", "workdir", "ResNet", "steps", "FSM after", "trained mask"],
                    [[m["label"], m["role"], f"`{m['workdir']}`", f"{m['depth']} (width {m['width']})", m["steps"],
                      f"layer{m['fsm_after']}" if m["fsm_after"] else "-", m["trained_mask"] or "-"]
                     for m in results["models"]])

    lines += ["## Verification (clean test images, and both images under the searched mask)", ""]
    rows = []
    for label in labels:
        for cond in ("clean", "masked"):
            v = results["verification"][label][cond]
            tar = v.get("tar_at_far_1e-2")
            rows.append([label, cond, _pm(v["accuracy"], v["accuracy_std"]), f"{v['auc']:.4f}",
                         "n/a (< 100 mismatched pairs)" if tar is None else _pct(tar)])
    lines += _table(["model", "images", "accuracy", "AUC", "TAR@FAR=1e-2"], rows)

    t1 = results["table1"]
    delta = t1["delta"]
    lines += ["## Table 1: accuracy under random masks of each hole-ratio level", "",
              f"Each test image gets its own random mask of the level (FSM models get the same masks in their "
              f"FSM branch); mean ± std over {t1['repeats']} repeats of the 10-fold accuracy. "
              + (f"δ = {delta[1]} − {delta[0]}. " if delta else "")
              + "Paper (resnet / resnet-mask / δ) in the last column.", ""]
    header = ["mask level", "hidden share (mean, min-max)"] + labels + (["δ"] if delta else []) + ["paper"]
    rows = []
    for row in t1["rows"]:
        share = "0" if row["range"] is None else \
            f"{row['ratio_mean']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})"
        cells = [row["level"], share]
        for label in labels:
            r = row["models"][label]
            cells.append(_pct(r["mean"]) if row["range"] is None else _pm(r["mean"], r["std"]))
        if delta:
            cells.append(f"{100 * row['delta']:+.2f}%")
        p = PAPER["table1"].get(row["level"])
        cells.append(f"{p[0]}% / {p[1]}% / {p[2]:+.2f}%" if p else "")
        rows.append(cells)
    lines += _table(header, rows)

    lines += ["## Table 2: Section 4.2 baseline (best mask of one hole-ratio level by Formula 3)", ""]
    t2 = results["table2"]
    if t2 is None:
        lines += [note for note in results["notes"] if note.startswith("Table 2")] + [""]
    else:
        lines += [f"The clean model `{t2['clean_model']}` scores {t2['rows'][0]['candidates']} random masks of each "
                  f"level by CE − γ·ratio (γ = {t2['gamma']:.3f}) on {t2['scoring_images']} of its training images; "
                  f"every model is then tested on test images under the best mask (masked) and after restoring "
                  f"them with the `{t2['attack']}` inpainting (the paper uses RFR-Net). Paper: resnet "
                  f"masked/inpainted, resnet-mask masked/inpainted, ratio.", ""]
        header = ["mask level"] + [f"{lb} {c}" for lb in labels for c in ("masked", "inpainted")] + ["ratio", "paper"]
        rows = []
        for row in t2["rows"]:
            cells = [row["level"]]
            for label in labels:
                r = row["models"][label]
                cells += [_pm(r["masked"]["accuracy"], r["masked"]["accuracy_std"]),
                          _pm(r["inpainted"]["accuracy"], r["inpainted"]["accuracy_std"])]
            p = PAPER["table2"][row["level"]]
            cells += [_pct(row["ratio"]), f"{p[0]}% / {p[1]}%, {p[2]}% / {p[3]}%, {p[4]}%"]
            rows.append(cells)
        lines += _table(header, rows)

    t3 = results["table3"]
    lines += ["## Table 3: accuracy with the searched mask (both images masked)", ""]
    lines += _table(labels + ["mask ratio"],
                    [[_pm(t3["models"][lb]["accuracy"], t3["models"][lb]["accuracy_std"]) for lb in labels]
                     + [_pct(t3["ratio"])],
                     [f"paper: {PAPER['table3'][_role_label(roles[lb])]}%" for lb in labels]
                     + [f"paper: {PAPER['table3']['ratio']}%"]])

    t4 = results["table4"]
    lines += ["## Table 4: desensitization methods", "",
              "dSSIM = 1 − SSIM and PSNR of the desensitized test images against the originals (higher dSSIM, "
              "lower PSNR = more private), and each model's accuracy when both images are desensitized that way. "
              "Blur kernel and mosaic block sizes are Fig. 7's (9, 18 and 8, 16 at 112 px) rescaled to this image "
              "size. The paper's table body is missing from its text; its prose gives dSSIM 0.81 for the mask "
              "(Table 8) and gains of 0.52 over blurring and 0.39 over mosaic, i.e. about 0.29 and 0.42.", ""]
    rows = []
    for row in t4["rows"]:
        rows.append([row["label"], f"{row['dssim_mean']:.3f} ± {row['dssim_std']:.3f}",
                     f"{row['psnr_mean']:.2f} ± {row['psnr_std']:.2f}"]
                    + [_pm(row["models"][lb]["accuracy"], row["models"][lb]["accuracy_std"]) for lb in labels]
                    + [f"{PAPER['table4_dssim'][row['method']]:.2f}"])
    lines += _table(["method", "dSSIM", "PSNR (dB)"] + labels + ["paper dSSIM"], rows)
    order = t4["ordering"]
    lines += [f"Paper's ordering dSSIM(mask) > dSSIM(mosaic) > dSSIM(blur): "
              f"**{'holds' if order['holds'] else 'does not hold'}** here "
              + "; ".join(f"{s} sizes: mask {order[s]['mask']:.3f}, mosaic {order[s]['mosaic']:.3f}, "
                          f"blur {order[s]['blur']:.3f} ({'holds' if order[s]['holds'] else 'fails'})"
                          for s in ("weak", "strong")) + ".", ""]

    t5 = results["table5"]
    lines += ["## Table 5: test situations", "",
              "Situation 1: query and gallery masked; 2: query clean, gallery masked; 3: both clean. An FSM "
              "model embeds clean images with no mask (FS = 1, its plain backbone).", ""]
    rows = []
    for label in labels:
        cells = [label] + [_pm(t5[label][s]["accuracy"], t5[label][s]["accuracy_std"])
                           for s in ("situation1", "situation2", "situation3")]
        paper = PAPER["table5"].get(_role_label(roles[label]))
        cells.append(" / ".join(f"{v}%" for v in paper) if paper else "")
        rows.append(cells)
    lines += _table(["model", "Situation 1", "Situation 2", "Situation 3", "paper (resnet-fsm)"], rows)

    if results["table7"]:
        lines += ["## Table 7: FSM insertion point (Situation 1, searched mask)", ""]
        lines += _table(["model", "FSM after", "accuracy", "paper"],
                        [[r["label"], f"layer{r['fsm_after']}", _pct(r["accuracy"]),
                          f"{PAPER['table7'][r['fsm_after']]}%"]
                         for r in results["table7"]])

    attacks = results["attacks"]
    lines += ["## Restoration attacks on the searched mask (cf. Table 2's inpainting columns, Table 6's PSNR)", ""]
    if attacks is None:
        lines += ["Skipped (--attacks=none).", ""]
    else:
        scope = "all test images" if attacks["all_images"] else f"a fixed subset of {attacks['images']} test images"
        lines += [f"Training-free inpainting of the hidden pixels on {scope} ({attacks['pairs']} pairs among them): "
                  "PSNR/SSIM of the restored image against the original (the masked row is the unrestored "
                  "baseline), and each model's accuracy when both images are restored. Restored images are "
                  "embedded without a mask. The paper restores with RFR-Net (Table 6: PSNR 18.4-19.3 dB for "
                  "its EBP masks).", ""]
        rows = []
        for row in attacks["rows"]:
            rows.append([row["name"],
                         "-" if row["psnr_mean"] is None else f"{row['psnr_mean']:.2f} ± {row['psnr_std']:.2f}",
                         "-" if row["ssim_mean"] is None else f"{row['ssim_mean']:.3f} ± {row['ssim_std']:.3f}"]
                        + [_pm(row["models"][lb]["accuracy"], row["models"][lb]["accuracy_std"]) for lb in labels])
        lines += _table(["images", "PSNR (dB)", "SSIM"] + labels, rows)

    if results.get("figures"):
        lines += ["## Figures", ""] + [f"- `{n}`: {_FIGURE_CAPTIONS[n]}" for n in results["figures"]] + [""]
    if results["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    seconds = results["seconds"]
    order = ("verification", "table1", "table2", "table4", "attacks", "total")
    lines += ["Seconds per section: " + ", ".join(f"{k} {seconds[k]:.1f}" for k in order if k in seconds) + ".", ""]
    return "\n".join(lines)


def _role_label(role: str) -> str:
    return ROLE_LABELS[role]


_FIGURE_CAPTIONS = {
    "examples.png": "test faces: original, searched mask, blur (two kernels), mosaic (two blocks), inpainted "
                    "(Figs. 5, 7)",
    "levels.png": "one random mask per hole-ratio level and a test face under it (Fig. 4)",
    "baseline.png": "Section 4.2 baseline masks (rows: levels 0.4-0.5, 0.5-0.6), a test face under them and its "
                    "inpainting (Fig. 5)",
}


# ----------------------------------------------------------------------------------------------
# The job


def read_run_record(workdir: str | Path) -> dict[str, Any]:
    path = Path(workdir) / "run.json"
    if not path.is_file():
        raise DataError(f"{workdir}: not a training workdir (no run.json); pass the --workdir of launch/train.py")
    from jaxdesens.workdir import RunDirectory

    return RunDirectory(workdir).read_record()


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


def check_out(job: EvaluateJob, data: str | None) -> Path:
    folders = {"--data": data, "--lfw_root": job.lfw_root, "--test_data": job.test_data}
    return check_output_folder(job.out, {f"{flag}={folder}": folder for flag, folder in folders.items()},
                               job.checkpoints)


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("jaxdesens", "jax", "jaxlib", "flax", "optax", "numpy", "dm-pix", "opencv-python-headless",
                    "scikit-image"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def default_command(job: EvaluateJob) -> str:
    """A command line equivalent to `job` (used when the caller did not pass the real one)."""
    args = ["python", "launch/evaluate.py"] + [f"--checkpoint={c}" for c in job.checkpoints]
    for field in dataclasses.fields(job):
        value = getattr(job, field.name)
        if field.name != "checkpoints" and value != field.default:
            args.append(f"--{field.name}={value}")
    return shlex.join(args)


def run_evaluate_job(job: EvaluateJob, progress: bool = True, log: Callable[[str], None] = print,
                     command: str | None = None) -> dict[str, Any]:
    from jaxdesens.jobs.search import search_data
    from jaxdesens.recognizer import load_recognizer

    if not job.checkpoints:
        raise ValueError("give at least one --checkpoint=WORKDIR")
    if not job.mask or not job.out:
        raise ValueError("--mask (the searched mask, e.g. from launch/search.py) and --out are required")
    lfw = job.lfw_pairs is not None
    if lfw and job.test_data is not None:
        raise ValueError("give either --lfw_pairs/--lfw_root or --test_data, not both")
    # A separate test set (LFW, or --test_data: identities no model trained on) frees the models
    # from sharing one training split or one training set.
    separate = lfw or job.test_data is not None
    records = [read_run_record(w) for w in job.checkpoints]
    check_compatible(job.checkpoints, records, separate)
    data = job.data if job.data is not None else records[0]["config"].get("data")
    out = check_out(job, data)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    recognizers = [load_recognizer(w) for w in job.checkpoints]
    roles = [r.config.model for r in recognizers]
    labels = role_labels(roles, job.checkpoints)
    models = [Model(label, role, rec, str(Path(w).resolve())) for label, role, rec, w in
              zip(labels, roles, recognizers, job.checkpoints)]
    config = recognizers[0].config
    size, channels = config.image_size, config.channels

    train_set = None
    need_train = not separate or (job.baseline_n > 0 and "resnet" in roles)
    if need_train:
        clean_first = next((m for m in models if m.role == "resnet"), models[0])
        try:
            train_set, held_out = search_data(clean_first.recognizer, job.data)
        except DataError as err:
            hint = " (or pass --baseline_n=0 to skip Table 2)" if separate else ""
            raise DataError(f"{err}{hint}") from err
        for model, record in zip(models, records if not separate else ()):
            classes = model.recognizer.variables["params"]["head"]["kernel"].shape[-1]
            stored = record.get("data_fingerprint")
            if classes != train_set.num_classes or (stored and stored != train_set.fingerprint):
                raise DataError(f"{model.workdir} was trained on other data than {train_set.source} "
                                f"({classes} classes, data fingerprint {stored} vs {train_set.fingerprint}); "
                                "its held-out identities would not be held out")
    if lfw:
        evalset = lfw_eval_set(job.lfw_pairs, job.lfw_root, size, channels)
    elif job.test_data is not None:
        from jaxdesens.data import load_dataset

        test_set = load_dataset(job.test_data, size, channels, progress=progress)
        if test_set.mask is not None:
            raise DataError(f"{job.test_data}: a desensitized export; --test_data needs the clean test images")
        evalset = identity_eval_set(test_set)
        evalset = dataclasses.replace(evalset, kind="test identities")
    else:
        evalset = identity_eval_set(held_out)
    raw_mask = load_mask(job.mask)
    mask = load_mask(job.mask, size)
    log(f"test data: {evalset.kind}, {len(evalset.images)} images of {evalset.identities} identities, "
        f"{len(evalset.pairs)} pairs; models: {', '.join(f'{m.label} ({m.role})' for m in models)}; "
        f"mask hides {1 - mask.mean():.1%}")

    results, artifacts = evaluate_models(models, evalset, mask, job, train_set, progress, log)
    results["figures"] = write_figures(out, evalset, mask, artifacts, job.attack_methods, job.examples)
    if raw_mask.shape != mask.shape:
        results["notes"].append(f"the mask file is {raw_mask.shape[0]}x{raw_mask.shape[1]}; resized (nearest) to "
                                f"{size}x{size}")
    results["command"] = command or default_command(job)
    results["settings"]["data"] = data
    results["mask"]["file_shape"] = list(raw_mask.shape)
    results["seconds"]["total"] = time.perf_counter() - start
    from jaxdesens.workdir import write_json_atomic

    write_json_atomic(out / "results.json", results)
    (out / "report.md").write_text(render_report(results))
    log(f"wrote {out / 'report.md'}, {out / 'results.json'} and {', '.join(results['figures'])}")
    return results
