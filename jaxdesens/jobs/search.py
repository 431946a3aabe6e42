"""The mask-search job: checkpoint + data -> EBP template -> Algorithm 1 -> mask, table, figures.

Output folder:
  mean_saliency.{npy,png}, template.{npy,png}, template_thresholds.png   (Formula 4, Fig. 10)
  occlusion.{npy,png}     mean occlusion sensitivity (CE rise per hidden patch): the ground truth
  faithfulness.png        mean EBP beside mean occlusion, the template, and the deletion curves
  mask.{png,npy}          the best mask (1/255 = visible)
  candidates.json         every candidate: objective, loss (CE or pair error; null below the ratio
                          floor), ratio, RMG hyper-parameters
  top_masks.png           the best candidates and faces under them (Fig. 6)
  summary.json            settings, best objective/loss/ratio, candidates scored, masks/s, verification,
                          faithfulness of the template to occlusion (correlation, effect share,
                          border share, deletion-curve areas)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdesens import figures
from jaxdesens.data import DataError, IdentitySet, split_identities
from jaxdesens.masks import freeform, levels
from jaxdesens.masks.io import save_mask
from jaxdesens.masks.ops import apply_mask, mask_ratio
from jaxdesens.models.functional import fold_batchnorm
from jaxdesens.paths import check_output_folder
from jaxdesens.recognizer import Recognizer, load_recognizer
from jaxdesens.saliency.faithfulness import faithfulness_report, save_faithfulness_figure
from jaxdesens.saliency.occlusion import default_patch, occlusion_maps
from jaxdesens.saliency.template import mean_saliency, rescale01, save_template_figure, threshold_template
from jaxdesens.search import SearchConfig, candidate_masks, check_objective, search_mask, table_rows
from jaxdesens.workdir import write_json_atomic

SALIENCY_METHODS = ("ebp", "occlusion")


@dataclasses.dataclass(frozen=True)
class SearchJob:
    checkpoint: str = ""
    out: str = ""
    data: str | None = None
    n: int = 2000
    T: float = 0.5
    K: int = 64
    gamma: float | None = None
    objective: str = "verification"
    min_ratio: float = 0.6
    adapt_floor: bool = False
    batch_images: int | None = None
    chunk: int = 0
    seed: int = 0
    saliency_layer: str = "layer3"
    contrast_layer: str = "layer4"
    contrastive: bool = True
    saliency: str = "ebp"
    occlusion_patch: int = 0
    occlusion_stride: int = 0
    faithfulness: bool = True
    without_ebp: bool = False
    level: int = -1
    bf16: bool = False
    evaluate: bool = True
    random_repeats: int = 16

    def __post_init__(self):
        if not self.checkpoint:
            raise ValueError("--checkpoint is required: the workdir of a clean model (launch/train.py --model=resnet)")
        if not self.out:
            raise ValueError("--out is required: the folder for the mask, the template and the candidate table")
        if not -1 <= self.level < len(levels.LEVELS):
            raise ValueError(f"--level must be -1 (free-form candidates) or 0..{len(levels.LEVELS) - 1}, "
                             f"got {self.level}")
        if self.K < 1:
            raise ValueError(f"--K must be >= 1, got {self.K}")
        if self.saliency not in SALIENCY_METHODS:
            raise ValueError(f"--saliency must be one of {'|'.join(SALIENCY_METHODS)}, got {self.saliency!r}")
        check_objective(self.objective)
        if self.batch_images is not None and self.batch_images < 2:
            raise ValueError(f"--batch_images must be >= 2 (scoring images per candidate), got {self.batch_images}")
        if self.occlusion_patch < 0 or self.occlusion_stride < 0:
            raise ValueError("--occlusion_patch and --occlusion_stride must be >= 0 (0 = from the image size)")


def default_gamma(num_classes: int, objective: str = "ce") -> float:
    """The loss of a chance-level recognizer: ln(C) for the cross-entropy, 0.5 for the pair error.
    Hiding the whole image (ratio 1) is then worth about as much as the recognition it can cost,
    which puts both terms of the objective on one scale."""
    return float(np.log(num_classes)) if objective == "ce" else 0.5


def default_batch_images(objective: str) -> int:
    """Scoring images per candidate: 128 for the pair error (4 images of each of 32 identities; its
    rank correlation with held-out verification rises with B: 0.31 / 0.37 / 0.41 at 32 / 64 / 120),
    32 for the cross-entropy (120 barely ranks better: 0.08 against 0.09, README)."""
    return 32 if objective == "ce" else 128


def balanced_sample(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `count` images, cycling over identities so each appears as evenly as possible."""
    order = rng.permutation(len(labels))
    rank = np.zeros(len(labels), np.int64)
    seen: dict[int, int] = {}
    for i in order:
        rank[i] = seen.get(int(labels[i]), 0)
        seen[int(labels[i])] = rank[i] + 1
    by_rank = order[np.argsort(rank[order], kind="stable")]
    return np.sort(by_rank[:min(count, len(labels))])


IMAGES_PER_IDENTITY = 4  # scoring images per identity for the verification objective


def grouped_sample(labels: np.ndarray, count: int, per_identity: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of about `count` images, `per_identity` from each of `count // per_identity`
    identities (fewer where an identity has fewer), so the batch holds same-identity pairs."""
    chosen: list[int] = []
    for identity in rng.permutation(np.unique(labels)):
        members = np.flatnonzero(labels == identity)
        if len(members) < 2:
            continue
        chosen.extend(rng.choice(members, min(per_identity, len(members)), replace=False))
        if len(chosen) >= count:
            break
    return np.sort(np.asarray(chosen[:count], np.int64))


def search_data(recognizer: Recognizer, data: str | None) -> tuple[IdentitySet, IdentitySet]:
    """The recognizer's own training identities (labels match its head) and its held-out ones."""
    from jaxdesens.train import load_data

    config = recognizer.config if data is None else dataclasses.replace(recognizer.config, data=data)
    dataset = load_data(config)
    train_set, held_out = split_identities(dataset, config.holdout, seed=config.split_seed)
    classes = recognizer.variables["params"]["head"]["kernel"].shape[-1]
    if train_set.num_classes != classes:
        raise DataError(f"{dataset.source}: gives {train_set.num_classes} training identities but the checkpoint's "
                        f"head has {classes}; pass the --data the checkpoint was trained on")
    return train_set, held_out


def same_ratio_random_masks(ratio: float, shape: tuple[int, int], count: int, seed: int,
                            ranges: freeform.StrokeRanges) -> np.ndarray:
    """Free-form masks (strokes visible, no template) whose ratio is closest to `ratio`."""
    strokes = np.asarray(freeform.random_strokes(jax.random.key(seed + 7919), 2048, *shape, ranges))
    ratios = mask_ratio(strokes)
    return strokes[np.argsort(np.abs(ratios - ratio))[:count]]


def verification_comparison(recognizer: Recognizer, held_out: IdentitySet, best_mask: np.ndarray,
                            random_masks: np.ndarray) -> dict[str, Any]:
    """Clean-model verification on held-out identities: clean, under the searched mask, and under
    random masks of the same ratio drawn without the template."""
    from jaxdesens.evaluation import pair_accuracy
    from jaxdesens.metrics.verification import generate_pairs

    pairs = generate_pairs(held_out.labels, None, seed=0, n_folds=10)
    runs = [pair_accuracy(recognizer, held_out.images, pairs, m)["accuracy"] for m in random_masks]
    return {
        "clean": pair_accuracy(recognizer, held_out.images, pairs)["accuracy"],
        "searched_mask": pair_accuracy(recognizer, held_out.images, pairs, best_mask)["accuracy"],
        "random_same_ratio_mean": float(np.mean(runs)), "random_same_ratio_std": float(np.std(runs)),
        "random_same_ratio_ratios": mask_ratio(random_masks).tolist(),
        "pairs": int(len(pairs.issame)),
    }


def run_search_job(job: SearchJob, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    from tqdm.auto import tqdm

    out = Path(job.out)
    recognizer = load_recognizer(job.checkpoint)
    data = job.data if job.data is not None else recognizer.config.data
    check_output_folder(out, {f"the data folder {data}": data}, [job.checkpoint])
    out.mkdir(parents=True, exist_ok=True)
    if recognizer.model.fsm_after is not None:
        raise ValueError(f"{job.checkpoint}: an FSM model; Algorithm 1 scores masks with a clean model "
                         "(train one with --model=resnet)")
    train_set, held_out = search_data(recognizer, job.data)
    rng = np.random.default_rng(job.seed)
    template_idx = balanced_sample(train_set.labels, job.K, rng)
    batch_images = job.batch_images or default_batch_images(job.objective)
    score_idx = (balanced_sample(train_set.labels, batch_images, rng) if job.objective == "ce"
                 else grouped_sample(train_set.labels, batch_images, IMAGES_PER_IDENTITY, rng))
    depth = recognizer.config.depth
    size = train_set.image_shape[:2]

    folded32 = fold_batchnorm(recognizer.variables, depth)
    images, labels = train_set.images[template_idx], train_set.labels[template_idx]
    ebp_map = occlusion_map = None
    patch = job.occlusion_patch or default_patch(min(size))
    if job.saliency == "ebp" or job.faithfulness:
        ebp_map = mean_saliency(folded32, images, labels, saliency_layer=job.saliency_layer,
                                contrast_layer=job.contrast_layer, contrastive=job.contrastive)
        np.save(out / "mean_saliency.npy", ebp_map)
        figures.save_grid(out / "mean_saliency.png", [[ebp_map]], scale=3)
    if job.saliency == "occlusion" or job.faithfulness:
        occlusion_map = occlusion_maps(folded32, images, labels, patch=patch,
                                       stride=job.occlusion_stride or max(1, patch // 2)).mean(0)
        np.save(out / "occlusion.npy", occlusion_map)
        figures.save_grid(out / "occlusion.png", [[rescale01(occlusion_map)]], scale=3)
    mean_map = ebp_map if job.saliency == "ebp" else rescale01(occlusion_map)
    if not job.without_ebp and mean_map.max() == mean_map.min():
        raise ValueError(f"the mean {job.saliency} map is constant, so no threshold makes a template: at "
                         f"{size[0]}x{size[1]} px --saliency_layer={job.saliency_layer} may be a single cell; "
                         "use a lower layer or larger images")
    saliency_template = threshold_template(mean_map, job.T)
    template = np.zeros(size, np.float32) if job.without_ebp else saliency_template
    save_mask(out / "template", template)
    save_template_figure(out / "template_thresholds.png", mean_map, example=train_set.images[template_idx[0]])
    faithfulness = None
    if job.faithfulness:
        faithfulness = faithfulness_report(folded32, images, labels, ebp_map, occlusion_map, saliency_template,
                                           random_scale=patch)
        save_faithfulness_figure(out / "faithfulness.png", ebp_map, occlusion_map, saliency_template, faithfulness,
                                 example=images[0])
        log(f"faithfulness to occlusion: r(EBP, occlusion) = {faithfulness['ebp_occlusion_correlation']:.2f}; "
            f"the template keeps {faithfulness['template_area']:.0%} of the pixels and "
            f"{faithfulness['occlusion_share_in_template']:.0%} of the occlusion effect; insertion AUC "
            + ", ".join(f"{k} {v:.2f}" for k, v in faithfulness["insertion_auc"].items()) + " (lower is better)")
    log(f"template: K={len(template_idx)} images, T={job.T}: keeps {template.mean():.1%} of the pixels"
        + (" (ignored: --without_ebp)" if job.without_ebp else ""))
    min_ratio = job.min_ratio
    hideable = float(mask_ratio(template))  # the most any candidate max(strokes, S) can hide
    if job.adapt_floor and hideable < min_ratio:
        min_ratio = 0.9 * hideable
        log(f"the template leaves {hideable:.0%} to hide: ratio floor lowered to {min_ratio:.2f}")
    if hideable < min_ratio:
        kept = {t: f"{(mean_map > t).mean():.0%}" for t in (0.5, 0.6, 0.7, 0.8, 0.9)}
        raise ValueError(f"the template at --T={job.T} keeps {template.mean():.0%} of the pixels, so no candidate "
                         f"can hide --min_ratio={job.min_ratio}; raise --T (pixels kept by T: {kept}) "
                         "or lower --min_ratio")

    gamma = default_gamma(train_set.num_classes, job.objective) if job.gamma is None else job.gamma
    config = SearchConfig(n=job.n, gamma=gamma, objective=job.objective, min_ratio=min_ratio,
                          batch_images=len(score_idx), chunk=job.chunk, seed=job.seed)
    candidates = None
    if job.level >= 0:
        candidates = levels.masks_at_level(jax.random.key(job.seed), job.level, job.n, *size)
        log(f"baseline (Section 4.2): {job.n} candidates from hole-ratio level {levels.LEVELS[job.level]}")
    folded = fold_batchnorm(recognizer.variables, depth, jnp.bfloat16 if job.bf16 else jnp.float32)
    bar = tqdm(total=job.n, disable=not progress, unit="candidate", desc="search", dynamic_ncols=True)

    def on_chunk(done: int, rate: float) -> None:
        bar.update(done)
        bar.set_postfix(masks_s=f"{rate:.0f}")

    result = search_mask(folded, train_set.images[score_idx], train_set.labels[score_idx], template, config,
                         candidates, on_chunk)
    bar.close()
    save_mask(out / "mask", result.best_mask)
    rows = table_rows(result)
    write_json_atomic(out / "candidates.json", rows)

    top = [r["index"] for r in rows[:8]]
    top_masks = candidates[top] if candidates is not None else candidate_masks(template, np.asarray(top), config)
    faces = train_set.images[score_idx[:3]].astype(np.float32) / 255.0
    grid = [[template if not job.without_ebp else np.ones(size), *faces]]
    grid += [[m, *apply_mask(faces, m)] for m in top_masks]
    figures.save_grid(out / "top_masks.png", grid, labels=["mask", "face 1", "face 2", "face 3"])

    summary: dict[str, Any] = {"settings": dataclasses.asdict(job), "gamma": gamma, "min_ratio": min_ratio,
                               "best_index": result.best_index, **result.best(),
                               "template_kept": float(template.mean()), "scored": result.scored,
                               "masks_per_s": result.masks_per_s, "seconds": result.seconds,
                               "device": jax.devices()[0].device_kind,
                               "scoring_images": len(score_idx), "template_images": len(template_idx)}
    if faithfulness is not None:
        summary["faithfulness"] = faithfulness
    loss = config.loss_name
    log(f"best mask #{result.best_index}: objective {summary['objective']:.4f}, {loss} {summary[loss]:.4f}, "
        f"ratio {summary['ratio']:.3f}; scored the {result.scored} of {job.n} candidates above the ratio floor "
        f"at {result.masks_per_s:.0f} masks/s ({result.seconds:.1f} s in all)")
    if job.evaluate:
        random_masks = same_ratio_random_masks(summary["ratio"], size, job.random_repeats, job.seed, config.ranges)
        summary["verification"] = verification_comparison(recognizer, held_out, result.best_mask, random_masks)
        v = summary["verification"]
        log(f"clean model, held-out verification: clean {v['clean']:.4f}, searched mask {v['searched_mask']:.4f}, "
            f"random same-ratio masks {v['random_same_ratio_mean']:.4f} +- {v['random_same_ratio_std']:.4f}")
    write_json_atomic(out / "summary.json", summary)
    return summary
