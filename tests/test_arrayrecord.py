"""The TFDS array_record store: exact pixels, labels and fingerprint round-trip, safe writes, no TensorFlow."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from jaxdesens.data.arrayrecord import (
    is_identity_arrayrecord,
    open_identity_arrayrecord,
    write_identity_arrayrecord,
)
from jaxdesens.data.errors import DataError
from jaxdesens.data.identity import IdentitySet, read_identity_folder, scan_identity_folder
from jaxdesens.data.images import load_image

SIZE = 16
# TFDS reads its metadata protos through a protobuf API that warns on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings(r"ignore:label\(\) is deprecated:DeprecationWarning")


def _write_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for person in ("alice", "bob", "carol"):
        (root / person).mkdir(parents=True)
        for j, ext in enumerate((".png", ".jpg", ".pgm", ".png")):
            shape = (20 + 3 * j, 24, 3)  # non-square: exercises resize + centre crop
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            image = Image.fromarray(pixels).convert("L") if ext == ".pgm" else Image.fromarray(pixels)
            image.save(root / person / f"{j}{ext}")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(identity folder, dataset written from it), checking that writing and reading never import TensorFlow.

    Where TensorFlow is not installed (as in the project venv) a hidden need for it fails here too.
    """
    if "tensorflow" in sys.modules:
        pytest.skip("tensorflow was imported by another test; cannot check independence from it")
    tmp = tmp_path_factory.mktemp("arrayrecord")
    folder = _write_folder(tmp / "faces")
    out = write_identity_arrayrecord(folder, tmp / "faces_ar", SIZE, shard_size=5)  # 12 images -> 3 shards
    open_identity_arrayrecord(out).to_identity_set()
    assert "tensorflow" not in sys.modules
    return folder, out


def test_round_trip_is_exact(built):
    folder, out = built
    index = scan_identity_folder(folder)
    src = open_identity_arrayrecord(out)
    assert len(src) == 12 and src.names == ("alice", "bob", "carol") and src.num_classes == 3
    assert src.image_shape == (SIZE, SIZE, 3)
    assert src.fingerprint == index.fingerprint()
    np.testing.assert_array_equal(src.labels, index.labels)
    for i, path in enumerate(index.paths):
        record = src[i]
        assert record["label"] == index.labels[i]
        assert record["image"].dtype == np.uint8
        np.testing.assert_array_equal(record["image"], load_image(path, SIZE, 3))

    loaded, reference = src.to_identity_set(), read_identity_folder(folder, SIZE)
    np.testing.assert_array_equal(loaded.images, reference.images)
    np.testing.assert_array_equal(loaded.labels, reference.labels)
    assert (loaded.names, loaded.fingerprint) == (reference.names, reference.fingerprint)


def test_grain_and_pickle(built):
    src = open_identity_arrayrecord(built[1])
    dataset = grain.MapDataset.source(src)
    np.testing.assert_array_equal(dataset[7]["image"], src[7]["image"])
    batch = next(iter(dataset.batch(4)))
    assert batch["image"].shape == (4, SIZE, SIZE, 3)
    np.testing.assert_array_equal(batch["label"], src.labels[:4])
    clone = pickle.loads(pickle.dumps(src))  # grain worker processes receive sources this way
    np.testing.assert_array_equal(clone[11]["image"], src[11]["image"])


def test_identity_set_input_keeps_order_and_fingerprint(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    labels = np.array([2, 0, 1, 0, 2, 1], np.int32)
    dataset = IdentitySet(images, labels, ("x", "y", "z"), "abc123", source="memory")
    out = write_identity_arrayrecord(dataset, tmp_path / "ds", 8, channels=1)
    loaded = open_identity_arrayrecord(out).to_identity_set()
    np.testing.assert_array_equal(loaded.images, images)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert (loaded.names, loaded.fingerprint) == (("x", "y", "z"), "abc123")
    with pytest.raises(DataError, match="pass matching image_size"):
        write_identity_arrayrecord(dataset, tmp_path / "other", 16, channels=1)


def test_refuses_non_empty_out_dir_and_cleans_up_failures(built, tmp_path):
    folder, _ = built
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="occupied"):
        write_identity_arrayrecord(folder, occupied, SIZE)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]

    broken = tmp_path / "broken"
    for person in ("a", "b"):
        (broken / person).mkdir(parents=True)
        (broken / person / "0.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image"):
        write_identity_arrayrecord(broken, tmp_path / "never", SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "occupied"]  # no temp folder left

    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_identity_arrayrecord(write_identity_arrayrecord(folder, empty, SIZE))


def test_other_folders_are_not_datasets(built, tmp_path):
    folder, out = built
    (tmp_path / "notes.txt").write_text("hello")
    assert is_identity_arrayrecord(out)
    for path in (tmp_path, folder, tmp_path / "missing"):
        assert not is_identity_arrayrecord(path)
    with pytest.raises(DataError, match=str(tmp_path)):
        open_identity_arrayrecord(tmp_path)
