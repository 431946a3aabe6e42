"""Each client's images: its share of a common layout or its own folder, its labels as head rows,
its batches of a round and the images it evaluates on. Both engines read data through here."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxdesens.config import TrainConfig
from jaxdesens.data import DataError, IdentitySet, split_identities
from jaxdesens.federation.config import FederatedConfig
from jaxdesens.federation.protocol import identity_digest

OWN_DATA = -1  # --partition=-1: the client's --data is its own folder, not a share of a common one


def partition(train_set: IdentitySet, fed: FederatedConfig, batch_size: int) -> list[np.ndarray]:
    """Image indices of each client's part of the training split (sorted, disjoint, covering it).

    `iid`: a seeded shuffle of all training images cut into K near-equal parts. `identity`: a
    seeded shuffle of the training identities cut into K groups; a client holds all images of
    its identities, and no identity is on two clients. Each part must fill one batch.
    """
    rng = np.random.default_rng(fed.partition_seed)
    if fed.split == "iid":
        parts = np.array_split(rng.permutation(len(train_set)), fed.clients)
    else:
        if fed.clients > train_set.num_classes:
            raise DataError(f"{train_set.source}: --split=identity needs at least one identity per client; "
                            f"{train_set.num_classes} training identities for --clients={fed.clients}")
        groups = np.array_split(rng.permutation(train_set.num_classes), fed.clients)
        parts = [np.flatnonzero(np.isin(train_set.labels, group)) for group in groups]
    parts = [np.sort(p) for p in parts]
    small = [(i, len(p)) for i, p in enumerate(parts) if len(p) < batch_size]
    if small:
        raise DataError(f"{train_set.source}: client parts {small} (client, images) hold fewer images than "
                        f"--batch_size={batch_size}; use fewer --clients or a smaller --batch_size")
    return parts


def client_share(dataset: IdentitySet, config: TrainConfig, fed: FederatedConfig, partition_index: int) -> IdentitySet:
    """The images a client trains on, labelled by its own identity index (`names` of `dataset`'s
    training split or of its own folder)."""
    if partition_index == OWN_DATA:
        return dataset
    if not 0 <= partition_index < fed.clients:
        raise ValueError(f"--partition={partition_index} must be in 0..{fed.clients - 1} (or -1 for own data)")
    train_set, _ = split_identities(dataset, config.holdout, seed=config.split_seed)
    return train_set.take(partition(train_set, fed, config.batch_size)[partition_index])


def digests_of(share: IdentitySet, key: bytes) -> list[str]:
    """The digests of the identities that have images in `share` (sorted)."""
    present = np.unique(share.labels)
    return sorted(identity_digest(key, share.names[i]) for i in present)


def relabel(share: IdentitySet, key: bytes, rows: dict[str, int], num_classes: int, who: str) -> IdentitySet:
    """`share` with labels replaced by head rows; images of identities the head lacks are dropped."""
    lookup = np.asarray([rows.get(identity_digest(key, name), -1) for name in share.names], np.int64)
    mapped = lookup[share.labels]
    keep = mapped >= 0
    if not keep.any():
        raise DataError(f"{who}: none of its identities is in the run's classifier head (a resumed run keeps the "
                        "head of its first round, or the federation key differs from the other clients')")
    if mapped[keep].max() >= num_classes:
        raise DataError(f"{who}: the server's label rows exceed its head of {num_classes} classes")
    return dataclasses.replace(share, images=share.images[keep], labels=mapped[keep].astype(np.int32),
                               names=tuple(f"row{i}" for i in range(num_classes)))


def client_seed(seed: int, client: int) -> int:
    """The shuffling/augmentation seed of one client's pipeline (independent across clients)."""
    return int(np.random.SeedSequence([seed, client]).generate_state(1)[0] & 0x7FFFFFFF)


def client_index(partition_index: int, share: IdentitySet) -> int:
    """The number that seeds a client's batches and masks: its partition, or one derived from its data."""
    if partition_index != OWN_DATA:
        return partition_index
    import hashlib

    return int(hashlib.sha256(share.fingerprint.encode()).hexdigest()[:7], 16)


def round_batches(part: IdentitySet, config: TrainConfig, fed: FederatedConfig, client: int,
                  round_index: int) -> dict[str, np.ndarray]:
    """Client `client`'s host batches `(local_steps, B, ...)` for round `round_index` (0-based).

    The training pipeline addressed by global step (steps `round_index * local_steps` on), with
    the client's own seed: the same batches in simulation, on Flower and after a resume.
    """
    from jaxdesens.data.pipeline import ArraySource, train_batches

    first = round_index * fed.local_steps
    flip = config.flip and part.mask is None  # mirroring an export would move the holes off its mask
    batches = list(train_batches(ArraySource(part.images, part.labels), config.batch_size, first + fed.local_steps,
                                 seed=client_seed(config.seed, client), start_step=first, flip=flip, threads=1))
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def eval_set(part: IdentitySet, fed: FederatedConfig, client: int, seed: int) -> dict[str, np.ndarray]:
    """The images a client evaluates on: `eval_images` of its own (a seeded choice), zero-padded
    to `eval_images` rows with a `weight` of 0 so every client's set has one shape."""
    n = min(fed.eval_images, len(part))
    chosen = np.sort(np.random.default_rng(client_seed(seed + 1, client)).permutation(len(part))[:n])
    pad = fed.eval_images - n
    images = np.concatenate([part.images[chosen], np.zeros((pad, *part.image_shape), np.uint8)])
    labels = np.concatenate([part.labels[chosen], np.zeros(pad, np.int32)]).astype(np.int32)
    weight = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return {"image": images, "label": labels, "weight": weight}
