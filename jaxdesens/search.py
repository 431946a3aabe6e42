"""Algorithm 1: search a desensitization mask with a clean recognizer.

Candidates are `m_ca = max(m_r, S)`: free-form strokes `m_r` that stay visible, united with the
critical template S so the regions recognition needs are never hidden (Formula 5, clipped to
{0, 1}). Each candidate is scored on a fixed batch of B labelled images by

    O = CE(model(x * m_ca), y) - gamma * ratio(m_ca)        (Formula 3; lower is better)

or, with `objective="verification"`, by the pair error of the masked images themselves,

    O = (1 - AUC(cos(f(x_i * m), f(x_j * m)); same identity vs not)) - gamma * ratio(m_ca),

subject to a policy floor `ratio(m_ca) >= min_ratio` (candidates below it score +inf and are not
run through the network: with the default floor that is about half of them on AT&T). A clean
model's CE on heavily masked faces is large and unbounded (15-25 nats on AT&T at 60% hidden),
so without the floor any moderate gamma prefers lightly masked candidates; the floor states
the privacy requirement directly, as the paper's Section 4.2 does by searching one level.

The pair error exists because the classifier's cross-entropy does not say which masks keep
unseen people verifiable: on AT&T its rank correlation with the clean model's held-out
verification across candidates is 0.09, the pair error's 0.41 (README, "Search objective").

Candidates are drawn on the device from per-candidate keys (so the result does not depend on the
chunk size); those above the floor are packed, in index order, into calls of `chunk` masks scored
with `jax.vmap` over masks inside one jitted call on the BatchNorm-folded network. The masks of a
call are split over every local device (the network and the B images are replicated), so a
machine with several accelerators scores proportionally more masks per second.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxdesens import parallel
from jaxdesens.masks import freeform
from jaxdesens.masks.ops import apply_mask, mask_ratio
from jaxdesens.models.functional import Folded, forward

OBJECTIVES = {"ce": "ce", "verification": "pair_error"}  # objective -> the name of its loss term


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {'|'.join(OBJECTIVES)}, got {objective!r}")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    n: int = 2000
    gamma: float = 3.0
    objective: str = "ce"
    min_ratio: float = 0.0
    batch_images: int = 32
    chunk: int = 0
    seed: int = 0
    ranges: freeform.StrokeRanges = freeform.StrokeRanges()

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.batch_images < 1:
            raise ValueError(f"--batch_images must be >= 1, got {self.batch_images}")
        if not 0.0 <= self.min_ratio < 1.0:
            raise ValueError(f"--min_ratio must lie in [0, 1), got {self.min_ratio}")
        if self.chunk < 0:
            raise ValueError(f"--chunk must be >= 0 (0 = choose from memory), got {self.chunk}")
        check_objective(self.objective)

    @property
    def loss_name(self) -> str:
        return OBJECTIVES[self.objective]


class PairIndices(NamedTuple):
    """Image-index pairs of the scoring batch: same identity (`same_*`) and different (`diff_*`)."""

    same_left: jax.Array
    same_right: jax.Array
    diff_left: jax.Array
    diff_right: jax.Array


def pair_indices(labels: np.ndarray) -> PairIndices:
    """Every unordered pair of the labelled images, split into same- and different-identity pairs."""
    left, right = np.triu_indices(len(labels), 1)
    same = labels[left] == labels[right]
    if not same.any() or same.all():
        raise ValueError("the verification objective needs two images of one identity and two identities among "
                         f"the scoring images (labels {np.unique(labels).tolist()}); raise --batch_images")
    return PairIndices(*(jnp.asarray(a, jnp.int32) for a in (left[same], right[same], left[~same], right[~same])))


def scoring_targets(labels: np.ndarray, objective: str) -> jax.Array | PairIndices:
    """What `score_masks` compares the masked images with: their labels, or their pairs."""
    return jnp.asarray(labels, jnp.int32) if objective == "ce" else pair_indices(np.asarray(labels))


def _cross_entropy(folded: Folded, images: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    logits = forward(folded, apply_mask(images, mask))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _pair_error(folded: Folded, images: jax.Array, pairs: PairIndices, mask: jax.Array) -> jax.Array:
    """1 - ROC AUC of the cosine similarity of masked embeddings (the model's pooled layer4), same
    identity against different: 0 when every same pair is closer than every other, 0.5 at chance."""
    features = forward(folded, apply_mask(images, mask), stop="layer4").astype(jnp.float32).mean(axis=(1, 2))
    emb = features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    sim = emb @ emb.T
    same = sim[pairs.same_left, pairs.same_right][:, None]
    diff = sim[pairs.diff_left, pairs.diff_right][None, :]
    return 1.0 - jnp.mean((same > diff) + 0.5 * (same == diff))


@jax.jit
def mask_ratios(masks: jax.Array) -> jax.Array:
    """Hidden share of each mask `(M, H, W)`: `1 - mean(m)`."""
    return mask_ratio(masks)


@functools.partial(jax.jit, static_argnames=("objective",))
def score_masks(folded: Folded, images: jax.Array, targets: jax.Array | PairIndices, masks: jax.Array,
                gamma: jax.Array, min_ratio: jax.Array, objective: str = "ce") -> dict[str, jax.Array]:
    """Objective, loss and ratio of each mask `(M, H, W)` on the images `(B, H, W, C)`.

    `targets` are the labels (`objective="ce"`) or the `pair_indices` of the labels ("verification").
    """
    loss_fn = _cross_entropy if objective == "ce" else _pair_error
    loss = jax.vmap(functools.partial(loss_fn, folded, images, targets))(masks)
    ratio = mask_ratios(masks)
    objective_value = jnp.where(ratio >= min_ratio, loss - gamma * ratio, jnp.inf)
    return {"objective": objective_value, OBJECTIVES[objective]: loss, "ratio": ratio}


def _candidate(key: jax.Array, template: jax.Array, ranges: freeform.StrokeRanges):
    k_params, k_draw = jax.random.split(key)
    params = freeform.sample_stroke_params(k_params, 1, ranges)
    strokes = freeform.draw_strokes(k_draw, params, *template.shape, max_strokes=ranges.max_strokes,
                                    vertex_cap=ranges.vertex_cap)[0]
    return jnp.maximum(strokes, template), jax.tree.map(lambda a: a[0], params)


@functools.partial(jax.jit, static_argnames=("ranges",))
def make_candidates(key: jax.Array, indices: jax.Array, template: jax.Array,
                    ranges: freeform.StrokeRanges) -> tuple[jax.Array, freeform.StrokeParams]:
    """Candidate masks `max(m_r, S)` for the given candidate indices, with their RMG parameters."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    return jax.vmap(lambda k: _candidate(k, template, ranges))(keys)


# On a CPU, larger calls are slower per mask (cache-bound): the AT&T search with the CPU model
# computed 88 masks/s at 32 masks per call, 71 at 64 and 64 at 128.
CPU_CHUNK = 32


def auto_chunk(n_images: int, image_shape: tuple[int, int, int], stem_channels: int, itemsize: int,
               device: jax.Device | None = None) -> int:
    """Masks per call: on an accelerator, as many as keep the live activations well inside its memory.

    A ResNet forward keeps a few stem-sized maps alive per image (`(H/2 * W/2 * C) * 3`); we aim
    at a quarter of the device's memory and a power of two in [8, 1024]. A CPU gets `CPU_CHUNK`.
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return CPU_CHUNK
    budget = (device.memory_stats() or {}).get("bytes_limit", 8 * 2**30) // 4
    height, width, _ = image_shape
    per_mask = n_images * (height // 2) * (width // 2) * stem_channels * itemsize * 3
    chunk = max(8, min(1024, budget // max(per_mask, 1)))
    return 1 << (int(chunk).bit_length() - 1)


@dataclasses.dataclass
class SearchResult:
    best_mask: np.ndarray
    best_index: int
    table: dict[str, np.ndarray]
    scored: int         # candidates above the floor, run through the network
    masks_per_s: float  # scored masks per second of scoring
    seconds: float

    def best(self) -> dict[str, float]:
        return {k: float(v[self.best_index]) for k, v in self.table.items() if k != "index"}


@functools.partial(jax.jit, donate_argnums=0)
def _enqueue(queue: jax.Array, count: jax.Array, masks: jax.Array, keep: jax.Array) -> jax.Array:
    """Writes the kept masks, in order, after the `count` already waiting in `queue` (2 x chunk)."""
    order = jnp.argsort(~keep, stable=True)
    return lax.dynamic_update_slice(queue, masks[order].astype(queue.dtype), (count, 0, 0))


@functools.partial(jax.jit, donate_argnums=0)
def _dequeue(queue: jax.Array) -> jax.Array:
    """Drops the first chunk (just scored) from `queue`."""
    chunk = queue.shape[0] // 2
    return jnp.concatenate([queue[chunk:], queue[chunk:]])


def _chunks(n: int, chunk: int) -> Iterator[np.ndarray]:
    for start in range(0, n, chunk):
        yield np.arange(start, min(n, start + chunk))


def search_mask(folded: Folded, images: np.ndarray, labels: np.ndarray, template: np.ndarray,
                config: SearchConfig, candidates: np.ndarray | None = None,
                on_chunk: Callable[[int, float], None] | None = None) -> SearchResult:
    """Runs Algorithm 1 and returns the best mask with the whole candidate table.

    `labels` name the images' identities; the verification objective scores every pair of them.
    `candidates` (M, H, W) replaces the generator (the Section 4.2 baseline scores masks of one
    hole-ratio level); otherwise `config.n` candidates `max(m_r, template)` are drawn. Candidates
    below `config.min_ratio` keep objective +inf and loss NaN in the table without being scored.
    `on_chunk(candidates done, scored masks per second of scoring so far)` reports progress.
    """
    dtype = folded["stem"]["w"].dtype
    mesh = parallel.make_mesh(jax.local_devices())
    spread = parallel.batch_sharded(mesh)  # masks of a call split over the devices
    x = jnp.asarray(images, jnp.float32)
    x = (x / 255.0 if images.dtype == np.uint8 else x).astype(dtype)
    gamma, min_ratio = jnp.float32(config.gamma), jnp.float32(config.min_ratio)
    folded, x, targets, gamma, min_ratio = parallel.put_replicated(
        (folded, x, scoring_targets(labels, config.objective), gamma, min_ratio), mesh)
    template_d = jnp.asarray(template, jnp.float32)
    n = config.n if candidates is None else len(candidates)
    chunk = config.chunk or mesh.size * auto_chunk(len(images), images.shape[1:], folded["stem"]["w"].shape[-1],
                                                   jnp.dtype(dtype).itemsize)
    chunk = -(-chunk // mesh.size) * mesh.size  # whole shares per device
    key = jax.random.key(config.seed)
    # Compiled ahead of time, so masks/s measures scoring and not compilation.
    masks_spec = jax.ShapeDtypeStruct((chunk, *template.shape), jnp.float32, sharding=spread)
    scorer = score_masks.lower(folded, x, targets, masks_spec, gamma, min_ratio, objective=config.objective).compile()
    loss = config.loss_name
    table = {"index": np.arange(n), "objective": np.full(n, np.inf, np.float32),
             loss: np.full(n, np.nan, np.float32), "ratio": np.zeros(n, np.float32)}
    best: tuple[float, int, np.ndarray | None] = (np.inf, -1, None)
    scoring_seconds, scored = 0.0, 0

    # Candidates above the floor wait in a fixed-shape device queue (no recompilation per count).
    queue = jnp.zeros((2 * chunk, *template.shape), jnp.float32)
    waiting = np.zeros(0, np.int64)

    def score(indices: np.ndarray, masks: jax.Array) -> None:
        """Scores the first `len(indices)` masks of the chunk `masks` (the rest is padding)."""
        nonlocal best, scoring_seconds, scored
        valid = len(indices)
        t0 = time.perf_counter()
        scores = jax.device_get(scorer(folded, x, targets, jax.device_put(masks, spread), gamma, min_ratio))
        scoring_seconds += time.perf_counter() - t0
        scored += valid
        table["objective"][indices] = scores["objective"][:valid]
        table[loss][indices] = scores[loss][:valid]
        local = int(np.argmin(scores["objective"][:valid]))  # indices ascend: ties go to the lowest index
        if scores["objective"][local] < best[0]:
            best = (float(scores["objective"][local]), int(indices[local]), np.asarray(masks[local]))

    start_time = time.perf_counter()
    for indices in _chunks(n, chunk):
        padded = np.concatenate([indices, np.full(chunk - len(indices), indices[-1])])
        if candidates is None:
            masks, params = make_candidates(key, jnp.asarray(padded), template_d, config.ranges)
        else:
            masks, params = jnp.asarray(candidates[padded], jnp.float32), None
        valid = len(indices)
        ratio = np.asarray(mask_ratios(masks))[:valid]
        table["ratio"][indices] = ratio
        if params is not None:
            for name, values in params._asdict().items():
                values = np.asarray(values)[:valid]
                table.setdefault(f"rmg_{name}", np.zeros(n, values.dtype))[indices] = values
        keep = ratio >= np.float32(config.min_ratio)
        if keep.any():
            queue = _enqueue(queue, len(waiting), masks, jnp.asarray(np.pad(keep, (0, chunk - valid))))
            waiting = np.concatenate([waiting, indices[keep]])
        if len(waiting) >= chunk:
            score(waiting[:chunk], queue[:chunk])
            queue, waiting = _dequeue(queue), waiting[chunk:]
        if on_chunk is not None:
            on_chunk(valid, scored / scoring_seconds if scoring_seconds else 0.0)
    if len(waiting):
        score(waiting, queue[:chunk])
    if best[1] < 0:
        raise ValueError(f"no candidate hides at least --min_ratio={config.min_ratio}; lower it, use a smaller "
                         "template (a higher --T) or draw more candidates")
    return SearchResult(best[2].astype(np.float32), best[1], table, scored=scored,
                        masks_per_s=scored / max(scoring_seconds, 1e-9), seconds=time.perf_counter() - start_time)


def candidate_masks(template: np.ndarray, indices: np.ndarray, config: SearchConfig) -> np.ndarray:
    """Regenerates candidates by index (for figures of the top masks) without storing all of them."""
    masks, _ = make_candidates(jax.random.key(config.seed), jnp.asarray(indices), jnp.asarray(template, jnp.float32),
                               config.ranges)
    return np.asarray(masks)


def table_rows(result: SearchResult) -> list[dict[str, Any]]:
    """The candidate table as JSON-ready rows, best first (null for the objective and loss of a
    candidate below the floor: strict JSON has no infinity or NaN)."""
    order = np.argsort(result.table["objective"], kind="stable")
    return [{k: _json_value(v[i]) for k, v in result.table.items()} for i in order]


def _json_value(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not np.isfinite(value) else value
