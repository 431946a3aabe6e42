"""grain input pipelines: seeded shuffle, flip augmentation, batching, per-process sharding.

Batches are addressed by step: `train_batches(..., start_step=s)` yields exactly the batches an
uninterrupted run would have produced from step `s` on, which is what makes resumption exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

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


class StepBatches:
    """Maps a step number to its batch: a pure function of (seed, step), so any step can be
    produced first, in any thread, and a resumed run sees exactly the batches it would have.

    Each epoch is a fresh seeded permutation of the source; a batch gathers its slice (one
    vectorised gather for in-memory sources, `__getitems__` or item reads otherwise) and mirrors
    a seeded half of its images. With several processes, each takes its share of the global batch.
    """

    def __init__(self, source: RandomAccessSource, batch_size: int, seed: int, flip: bool = True):
        self.source, self.batch_size, self.seed, self.flip = source, batch_size, seed, flip
        self.per_epoch = len(source) // batch_size
        if self.per_epoch < 1:
            raise ValueError(f"--batch_size={batch_size} exceeds the {len(source)} training images")
        self._epoch: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        cached = self._epoch  # one attribute read: safe when reader threads race
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source)))
            self._epoch = cached
        return cached[1]

    def _read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(self.source, ArraySource):
            return {"image": self.source.images[indices], "label": self.source.labels[indices].astype(np.int32)}
        if hasattr(self.source, "__getitems__"):
            records = self.source.__getitems__(list(indices))
        else:
            records = [self.source[int(i)] for i in indices]
        return {"image": np.stack([r["image"] for r in records]),
                "label": np.asarray([r["label"] for r in records], np.int32)}

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, position = divmod(int(step), self.per_epoch)
        indices = self._permutation(epoch)[position * self.batch_size:(position + 1) * self.batch_size]
        flips = np.random.default_rng([self.seed, int(step), 1]).random(self.batch_size) < 0.5
        share = self.batch_size // jax.process_count()
        mine = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
        batch = self._read(indices[mine])
        if self.flip:
            chosen = flips[mine]
            batch["image"][chosen] = batch["image"][chosen, :, ::-1]
        return batch


def train_batches(source: RandomAccessSource, batch_size: int, steps: int, seed: int, start_step: int = 0,
                  flip: bool = True, threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """Host batches for steps `start_step..steps-1`, assembled ahead by grain reader threads."""
    ds = grain.MapDataset.range(start_step, steps).map(StepBatches(source, batch_size, seed, flip))
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
