"""Preprocessed identity sets stored as a TFDS `array_record` dataset, read with random access.

Decoding and resizing JPEGs dominates epoch time on large face sets; storing the fixed-size
uint8 pixels once lets every later epoch read them directly. The result is a plain TFDS dataset
folder (`tfds.builder_from_directory(dir).as_data_source("train")` opens it), and neither
writing nor reading needs TensorFlow: only `tfds.load`/`as_dataset` would.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxdesens.data.errors import DataError
from jaxdesens.data.identity import IdentitySet, scan_identity_folder
from jaxdesens.data.images import load_images

FORMAT = "jaxdesens.identity_arrayrecord/1"  # marks our datasets among other TFDS folders
_DATASET_NAME = "identity_set"
_SPLIT = "train"
_LABELS_FILE = "labels.npy"  # all labels in record order, so `.labels` needs no record reads
_DECODE_CHUNK = 512  # images decoded per thread-pool batch: bounds memory when streaming a folder
# One record per chunk for cheap random access, and no compression: on 64x64 face crops brotli (the
# array_record default TFDS keeps) saves 15% of disk but halves raw read speed, and zlib pixel encoding
# (`Tensor(encoding="zlib")`) saves 4% more but makes decoding ~3x slower.
_WRITER_OPTIONS = "group_size:1,uncompressed"


def write_identity_arrayrecord(data: str | os.PathLike | IdentitySet, out_dir: str | os.PathLike,
                               image_size: int, channels: int = 3, shard_size: int = 10_000,
                               progress: bool = False) -> Path:
    """Writes an identity folder (decoded streaming) or an `IdentitySet` as a TFDS array_record dataset.

    Records keep the input order (folder order for a folder), so `open_identity_arrayrecord(out)[i]`
    is image `i` of `read_identity_folder`. Everything is written to a sibling temporary folder
    that is renamed into place at the end, so an interrupted run never leaves a half dataset.
    """
    import tensorflow_datasets as tfds

    out_dir = Path(out_dir)
    _refuse_non_empty(out_dir)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if isinstance(data, IdentitySet):
        if data.image_shape != (image_size, image_size, channels):
            raise DataError(f"{data.source}: images are {data.image_shape}, expected "
                            f"{(image_size, image_size, channels)}; pass matching image_size/channels")
        names, labels, fingerprint, source = data.names, data.labels, data.fingerprint, data.source
        images: Iterator[np.ndarray] = iter(data.images)
    else:
        index = scan_identity_folder(data)
        names, labels, fingerprint, source = index.names, index.labels, index.fingerprint(), str(index.root)
        images = _decode_streaming(index.paths, image_size, channels)
    bad = [name for name in names if not name or name != name.strip() or "\n" in name]
    if bad:  # TFDS stores class names one per line and strips them
        raise DataError(f"{source}: identity names {bad[:3]!r} are empty or have surrounding whitespace/newlines;"
                        " rename those folders")

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(image_size, image_size, channels), dtype=np.uint8,
                                      encoding=tfds.features.Encoding.BYTES),
        "label": tfds.features.ClassLabel(names=list(names)),
    })
    metadata = tfds.core.MetadataDict(format=FORMAT, image_size=int(image_size), channels=int(channels),
                                      fingerprint=fingerprint, built_from=source)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        shard_lengths, num_bytes = _write_shards(tmp, features, images, labels, shard_size, progress)
        split = tfds.core.SplitInfo(name=_SPLIT, shard_lengths=shard_lengths, num_bytes=num_bytes)
        # check_data=False: the check reads through `as_dataset`, which needs TensorFlow.
        tfds.folder_dataset.write_metadata(data_dir=tmp, features=features, split_infos=[split],
                                           check_data=False, metadata=metadata,
                                           description=f"Preprocessed identity set from {source}")
        np.save(tmp / _LABELS_FILE, np.asarray(labels, np.int32))
        _refuse_non_empty(out_dir)  # it may have been filled while we were writing
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _refuse_non_empty(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: already exists and is not an empty folder; choose a new output folder")


def _decode_streaming(paths: tuple[Path, ...], image_size: int, channels: int) -> Iterator[np.ndarray]:
    for start in range(0, len(paths), _DECODE_CHUNK):
        yield from load_images(list(paths[start:start + _DECODE_CHUNK]), image_size, channels)


def _write_shards(folder: Path, features, images: Iterator[np.ndarray], labels: np.ndarray, shard_size: int,
                  progress: bool) -> tuple[list[int], int]:
    """Serializes records straight into shards (one pass, nothing buffered, unlike a TFDS builder's shuffler)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm.auto import tqdm

    num_shards = max(1, -(-len(labels) // shard_size))
    shard_lengths, num_bytes = [], 0
    with tqdm(total=len(labels), disable=not progress, desc="writing array_record", unit="img") as bar:
        for shard in range(num_shards):
            path = folder / f"{_DATASET_NAME}-{_SPLIT}.array_record-{shard:05d}-of-{num_shards:05d}"
            writer = ArrayRecordWriter(os.fspath(path), _WRITER_OPTIONS)
            shard_labels = labels[shard * shard_size:(shard + 1) * shard_size]
            for label in shard_labels:
                record = features.serialize_example({"image": next(images), "label": int(label)})
                writer.write(record)
                num_bytes += len(record)
            writer.close()
            shard_lengths.append(len(shard_labels))
            bar.update(len(shard_labels))
    return shard_lengths, num_bytes


class ArrayRecordIdentitySource:
    """Random access to a written identity set: `src[i] -> {"image": uint8 HWC, "label": int}`.

    Satisfies grain's `RandomAccessDataSource` (`__len__`, `__getitem__`, batched `__getitems__`)
    and pickles as its path, so grain worker processes reopen the files instead of copying readers.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        builder = _builder(self.path)
        self._source = builder.as_data_source(split=_SPLIT)
        info, meta = builder.info, builder.info.metadata
        self.names: tuple[str, ...] = tuple(info.features["label"].names)
        self.image_shape: tuple[int, int, int] = (meta["image_size"], meta["image_size"], meta["channels"])
        self.fingerprint: str = meta["fingerprint"]
        self.labels: np.ndarray = np.load(self.path / _LABELS_FILE)
        if len(self.labels) != len(self._source):
            raise DataError(f"{self.path}: {_LABELS_FILE} has {len(self.labels)} labels for "
                            f"{len(self._source)} records; the dataset is damaged, rebuild it")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
        return _as_record(self._source[index])

    def __getitems__(self, indices: list[int]) -> list[dict[str, np.ndarray | int]]:
        return [_as_record(r) for r in self._source.__getitems__(list(indices))]

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return (f"ArrayRecordIdentitySource({str(self.path)!r}, images={len(self)}, "
                f"identities={self.num_classes}, shape={self.image_shape})")

    def to_identity_set(self, batch: int = 1024) -> IdentitySet:
        """Loads every image into memory (for sets small enough to train from RAM)."""
        images = np.empty((len(self), *self.image_shape), np.uint8)
        for start in range(0, len(self), batch):
            for offset, record in enumerate(self.__getitems__(range(start, min(start + batch, len(self))))):
                images[start + offset] = record["image"]
        return IdentitySet(images, self.labels.copy(), self.names, self.fingerprint, source=str(self.path))


def _as_record(record: dict) -> dict[str, np.ndarray | int]:
    return {"image": record["image"], "label": int(record["label"])}


def _builder(path: Path):
    """Returns the TFDS read-only builder of `path`, or a DataError saying why `path` is not ours."""
    if not (path / "dataset_info.json").is_file() or not (path / _LABELS_FILE).is_file():
        raise DataError(f"{path}: not an identity array_record dataset (no dataset_info.json/{_LABELS_FILE}); "
                        "create one with jaxdesens.data.arrayrecord.write_identity_arrayrecord")
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder_from_directory(path)
        found = (builder.info.metadata or {}).get("format")
    except Exception as err:  # TFDS raises many types for damaged metadata
        raise DataError(f"{path}: cannot open as an identity array_record dataset ({err})") from err
    if found != FORMAT:
        raise DataError(f"{path}: a TFDS dataset but not an identity array_record one "
                        f"(metadata format {found!r}, expected {FORMAT!r})")
    return builder


def open_identity_arrayrecord(path: str | os.PathLike) -> ArrayRecordIdentitySource:
    """Opens a folder written by `write_identity_arrayrecord` for random access."""
    return ArrayRecordIdentitySource(path)


def is_identity_arrayrecord(path: str | os.PathLike) -> bool:
    """True when `path` holds a dataset written by `write_identity_arrayrecord` (for `--data` dispatch)."""
    try:
        _builder(Path(path))
    except DataError:
        return False
    return True
