"""grain input pipelines: seeded shuffle, flip augmentation, batching, per-process sharding.

Batches are addressed by step: `train_batches(..., start_step=s)` yields exactly the batches an
uninterrupted run would have produced from step `s` on, which is what makes resumption exact.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Protocol

import grain
import jax
import numpy as np


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, Any]: ...


class ArraySource:
    """In-memory images and labels as a grain random-access source."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": np.int32(self.labels[index])}


def _random_flip(record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < 0.5:
        record = {**record, "image": record["image"][:, ::-1]}
    return record


def train_dataset(source: RandomAccessSource, batch_size: int, steps: int, seed: int,
                  flip: bool = True) -> grain.MapDataset:
    """Epoch-wise reshuffled, batched dataset with at least `steps` batches, for this process."""
    per_epoch = len(source) // batch_size
    if per_epoch < 1:
        raise ValueError(f"--batch_size={batch_size} exceeds the {len(source)} training images")
    epochs = math.ceil(steps / per_epoch) + 1
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(epochs)
    if jax.process_count() > 1:
        ds = ds[jax.process_index()::jax.process_count()]
        batch_size //= jax.process_count()
    if flip:
        ds = ds.random_map(_random_flip, seed=seed + 1)
    return ds.batch(batch_size, drop_remainder=True)


def train_batches(source: RandomAccessSource, batch_size: int, steps: int, seed: int, start_step: int = 0,
                  flip: bool = True, threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """Host batches for steps `start_step..steps-1`, decoded ahead by grain reader threads."""
    ds = train_dataset(source, batch_size, steps, seed, flip)[start_step:steps]
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads * 2))
    return iter(ds.to_iter_dataset(options))


def eval_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Fixed-size batches (the last one zero-padded) so one compiled program serves them all."""
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        valid = len(chunk)
        if valid < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - valid, *chunk.shape[1:]), chunk.dtype)])
        yield chunk, valid
