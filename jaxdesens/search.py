"""Algorithm 1: search a desensitization mask with a clean recognizer.

Candidates are `m_ca = max(m_r, S)`: free-form strokes `m_r` that stay visible, united with the
critical template S so the regions recognition needs are never hidden (Formula 5, clipped to
{0, 1}). Each candidate is scored on a fixed batch of B labelled images by

    O = CE(model(x * m_ca), y) - gamma * ratio(m_ca)        (Formula 3; lower is better)

subject to a policy floor `ratio(m_ca) >= min_ratio` (candidates below it score +inf). A clean
model's CE on heavily masked faces is large and unbounded (15-25 nats on AT&T at 60% hidden),
so without the floor any moderate gamma prefers lightly masked candidates; the floor states
the privacy requirement directly, as the paper's Section 4.2 does by searching one level.

Candidates are drawn on the device from per-candidate keys (so the result does not depend on the
chunk size), and scored `chunk` at a time with `jax.vmap` over masks inside one jitted call on
the BatchNorm-folded network.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdesens.masks import freeform
from jaxdesens.models.functional import Folded, forward


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    n: int = 2000
    gamma: float = 3.0
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


def _objective_terms(folded: Folded, images: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    logits = forward(folded, images * mask[None, :, :, None].astype(images.dtype))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@jax.jit
def score_masks(folded: Folded, images: jax.Array, labels: jax.Array, masks: jax.Array,
                gamma: jax.Array, min_ratio: jax.Array) -> dict[str, jax.Array]:
    """Objective, CE and ratio of each mask `(M, H, W)` on the images `(B, H, W, C)`."""
    ce = jax.vmap(functools.partial(_objective_terms, folded, images, labels))(masks)
    ratio = 1.0 - jnp.mean(masks.astype(jnp.float32), axis=(1, 2))
    objective = jnp.where(ratio >= min_ratio, ce - gamma * ratio, jnp.inf)
    return {"objective": objective, "ce": ce, "ratio": ratio}


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


def auto_chunk(n_images: int, image_shape: tuple[int, int, int], stem_channels: int, itemsize: int,
               device: jax.Device | None = None) -> int:
    """Masks per call so the live activations fit comfortably in device memory.

    A ResNet forward keeps a few stem-sized maps alive per image (`(H/2 * W/2 * C) * 3`); we aim
    at a quarter of the device's memory (or 2 GiB on a CPU) and a power of two in [8, 1024].
    """
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    budget = (stats or {}).get("bytes_limit", 8 * 2**30) // 4
    height, width, _ = image_shape
    per_mask = n_images * (height // 2) * (width // 2) * stem_channels * itemsize * 3
    chunk = max(8, min(1024, budget // max(per_mask, 1)))
    return 1 << (int(chunk).bit_length() - 1)


@dataclasses.dataclass
class SearchResult:
    best_mask: np.ndarray
    best_index: int
    table: dict[str, np.ndarray]
    masks_per_s: float
    seconds: float

    def best(self) -> dict[str, float]:
        return {k: float(v[self.best_index]) for k, v in self.table.items() if k != "index"}


def _chunks(n: int, chunk: int) -> Iterator[np.ndarray]:
    for start in range(0, n, chunk):
        yield np.arange(start, min(n, start + chunk))


def search_mask(folded: Folded, images: np.ndarray, labels: np.ndarray, template: np.ndarray,
                config: SearchConfig, candidates: np.ndarray | None = None,
                on_chunk: Callable[[int, float], None] | None = None) -> SearchResult:
    """Runs Algorithm 1 and returns the best mask with the whole candidate table.

    `candidates` (M, H, W) replaces the generator (the Section 4.2 baseline scores masks of one
    hole-ratio level); otherwise `config.n` candidates `max(m_r, template)` are drawn.
    """
    dtype = folded["stem"]["w"].dtype
    x = jnp.asarray(images, jnp.float32)
    x = (x / 255.0 if images.dtype == np.uint8 else x).astype(dtype)
    y = jnp.asarray(labels, jnp.int32)
    template_d = jnp.asarray(template, jnp.float32)
    n = config.n if candidates is None else len(candidates)
    chunk = config.chunk or auto_chunk(len(images), images.shape[1:], folded["stem"]["w"].shape[-1],
                                       jnp.dtype(dtype).itemsize)
    key = jax.random.key(config.seed)
    gamma, min_ratio = jnp.float32(config.gamma), jnp.float32(config.min_ratio)
    # Compiled ahead of time, so masks/s measures scoring and not compilation.
    scorer = score_masks.lower(folded, x, y, jax.ShapeDtypeStruct((chunk, *template.shape), jnp.float32),
                               gamma, min_ratio).compile()
    rows: list[dict[str, np.ndarray]] = []
    best = (np.inf, -1, None)
    start_time = time.perf_counter()
    scoring_seconds = 0.0
    for indices in _chunks(n, chunk):
        padded = np.concatenate([indices, np.full(chunk - len(indices), indices[-1])])
        if candidates is None:
            masks, params = make_candidates(key, jnp.asarray(padded), template_d, config.ranges)
        else:
            masks, params = jnp.asarray(candidates[padded], jnp.float32), None
        masks.block_until_ready()
        t0 = time.perf_counter()
        scores = jax.device_get(scorer(folded, x, y, masks, gamma, min_ratio))
        scoring_seconds += time.perf_counter() - t0
        valid = len(indices)
        row = {k: np.asarray(v[:valid]) for k, v in scores.items()}
        if params is not None:
            row.update({f"rmg_{k}": np.asarray(v[:valid]) for k, v in params._asdict().items()})
        row["index"] = indices
        rows.append(row)
        local = int(np.argmin(row["objective"]))
        if row["objective"][local] < best[0]:
            best = (row["objective"][local], int(indices[local]), np.asarray(masks[local]))
        if on_chunk is not None:
            on_chunk(valid, valid / max(time.perf_counter() - t0, 1e-9))
    if best[1] < 0:
        raise ValueError(f"no candidate hides at least --min_ratio={config.min_ratio}; lower it, use a smaller "
                         "template (a higher --T) or draw more candidates")
    table = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    total = time.perf_counter() - start_time
    return SearchResult(best[2].astype(np.float32), best[1], table, masks_per_s=n / max(scoring_seconds, 1e-9),
                        seconds=total)


def candidate_masks(template: np.ndarray, indices: np.ndarray, config: SearchConfig) -> np.ndarray:
    """Regenerates candidates by index (for figures of the top masks) without storing all of them."""
    masks, _ = make_candidates(jax.random.key(config.seed), jnp.asarray(indices), jnp.asarray(template, jnp.float32),
                               config.ranges)
    return np.asarray(masks)


def table_rows(result: SearchResult) -> list[dict[str, Any]]:
    """The candidate table as JSON-ready rows, best first."""
    order = np.argsort(result.table["objective"], kind="stable")
    return [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in result.table.items()} for i in order]
