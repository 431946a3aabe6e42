"""Identity folders (AT&T as it is), bad inputs, splits, the synthetic set and grain pipelines."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import write_identity_folder
from PIL import Image

from jaxdesens.data import DataError, SyntheticConfig, load_dataset, make_synthetic, read_identity_folder
from jaxdesens.data.identity import scan_identity_folder
from jaxdesens.data.images import load_image
from jaxdesens.data.pipeline import ArraySource, eval_batches, train_batches
from jaxdesens.data.splits import split_identities, split_per_identity


def test_att_folder_is_read_as_it_is(att_dir):
    dataset = read_identity_folder(att_dir, image_size=56)
    assert len(dataset) == 400 and dataset.num_classes == 40
    assert dataset.image_shape == (56, 56, 3)
    assert np.bincount(dataset.labels).tolist() == [10] * 40
    assert set(dataset.names) == {f"s{i}" for i in range(1, 41)}
    # Greyscale PGM repeated to three identical channels.
    assert np.array_equal(dataset.images[..., 0], dataset.images[..., 2])
    grey = read_identity_folder(att_dir, image_size=56, channels=1)
    assert grey.image_shape == (56, 56, 1)
    assert np.array_equal(grey.images[..., 0], dataset.images[..., 0])
    assert dataset.fingerprint == read_identity_folder(att_dir, image_size=32).fingerprint


def test_resize_keeps_centre_of_non_square_image(tmp_path):
    pixels = np.zeros((112, 92), np.uint8)
    pixels[50:62, 40:52] = 255  # a bright square at the centre
    Image.fromarray(pixels).save(tmp_path / "face.pgm")
    image = load_image(tmp_path / "face.pgm", 56)
    assert image.shape == (56, 56, 3)
    assert image[28, 28, 0] > 200 and image[2, 2, 0] < 10


def test_mixed_formats_and_colour(tmp_path):
    root = write_identity_folder(tmp_path / "ids", identities=3, per_identity=3, size=20)  # grey PNG, JPEG, PGM
    colour = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(colour).save(root / "person01" / "0009.png")
    (root / "person00" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    dataset = read_identity_folder(root, image_size=20)  # the files' own size: no resampling
    assert len(dataset) == 10 and dataset.names == ("person00", "person01", "person02")
    in_colour = [i for i, image in enumerate(dataset.images) if not np.array_equal(image[..., 0], image[..., 1])]
    assert len(in_colour) == 1  # grey sources come back as three equal channels, the colour one keeps its own
    np.testing.assert_array_equal(dataset.images[in_colour[0]], colour)
    assert dataset.names[dataset.labels[in_colour[0]]] == "person01"


@pytest.mark.parametrize("case", ["missing", "file", "empty", "flat", "one_identity", "corrupt"])
def test_bad_folders_name_the_path(tmp_path, case):
    root = tmp_path / "data"
    if case == "file":
        root.write_text("x")
    elif case == "empty":
        root.mkdir()
    elif case == "flat":
        root.mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "a.png")
    elif case == "one_identity":
        write_identity_folder(root, identities=1)
    elif case == "corrupt":
        write_identity_folder(root, identities=2)
        (root / "person01" / "0002.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(DataError) as err:
        read_identity_folder(root, image_size=16)
    expected = str(root / "person01" / "0002.jpg") if case == "corrupt" else str(root)
    assert expected in str(err.value)


def test_identity_split_is_disjoint_and_deterministic(att_dir):
    dataset = read_identity_folder(att_dir, image_size=16)
    train, held = split_identities(dataset, 0.25, seed=0)
    assert train.num_classes == 30 and held.num_classes == 10
    assert not set(train.names) & set(held.names)
    assert train.labels.max() == 29 and held.labels.max() == 9
    again, _ = split_identities(dataset, 0.25, seed=0)
    assert again.names == train.names
    other, _ = split_identities(dataset, 0.25, seed=1)
    assert other.names != train.names
    with pytest.raises(DataError):
        split_identities(dataset, 40)


def test_per_identity_split():
    dataset = make_synthetic(SyntheticConfig(identities=5, images_per_identity=6, image_size=16))
    first, second = split_per_identity(dataset, 2, seed=0)
    assert len(second) == 10 and len(first) == 20
    assert np.bincount(second.labels).tolist() == [2] * 5


def test_synthetic_is_deterministic_and_identity_structured():
    config = SyntheticConfig(identities=6, images_per_identity=5, image_size=32)
    a, b = make_synthetic(config), make_synthetic(config)
    assert np.array_equal(a.images, b.images) and a.fingerprint == b.fingerprint
    other = make_synthetic(SyntheticConfig(identities=6, images_per_identity=5, image_size=32, seed=1))
    assert other.fingerprint != a.fingerprint
    x = a.images.reshape(len(a), -1).astype(np.float64)
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    dist = ((x[:, None] - x[None]) ** 2).mean(-1)
    same = a.labels[:, None] == a.labels[None]
    off_diagonal = ~np.eye(len(a), dtype=bool)
    # Images of one identity are closer on average than images of different identities ...
    assert dist[same & off_diagonal].mean() < dist[~same].mean()
    # ... but not trivially: some images are closer to another identity than to their own.
    nearest_other = np.where(same, np.inf, dist).min(1)
    farthest_own = np.where(same & off_diagonal, dist, -np.inf).max(1)
    assert (farthest_own > nearest_other).any()


def test_load_dataset_dispatches_to_synthetic_and_arrayrecord(tmp_path):
    from jaxdesens.data.arrayrecord import write_identity_arrayrecord

    synthetic = load_dataset(None, 16, synthetic=SyntheticConfig(identities=3, images_per_identity=2))
    assert synthetic.image_shape == (16, 16, 3) and len(synthetic) == 6
    root = write_identity_folder(tmp_path / "ids")
    out = write_identity_arrayrecord(root, tmp_path / "ar", image_size=16)
    from_record = load_dataset(out, 16)
    from_folder = load_dataset(root, 16)
    assert np.array_equal(from_record.images, from_folder.images)
    with pytest.raises(DataError, match="image_size=16"):
        load_dataset(out, 24)


def _epoch_batches(start: int, steps: int = 7):
    images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1) * np.ones((1, 2, 3, 1), np.uint8)
    source = ArraySource(images, np.arange(20, dtype=np.int32))
    return [b["label"].tolist() for b in train_batches(source, 6, steps, seed=3, start_step=start, flip=True)]


def test_pipeline_is_seeded_and_resumable():
    full = _epoch_batches(0)
    assert len(full) == 7 and all(len(b) == 6 for b in full)
    assert _epoch_batches(4) == full[4:]
    # Every image appears once per epoch (3 full batches of 6 from 20 images).
    assert len(set(sum(full[:3], []))) == 18


def test_flip_is_per_image_and_seeded():
    image = np.arange(12, dtype=np.uint8).reshape(1, 2, 6, 1).repeat(16, 0)
    source = ArraySource(image, np.zeros(16, np.int32))
    batch = next(train_batches(source, 16, 1, seed=0, flip=True))
    flipped = (batch["image"][:, 0, 0, 0] == 5).sum()
    assert 0 < flipped < 16
    again = next(train_batches(source, 16, 1, seed=0, flip=True))
    assert np.array_equal(batch["image"], again["image"])


def test_eval_batches_pad_the_last_batch():
    chunks = list(eval_batches(np.ones((5, 2, 2, 1), np.uint8), 2))
    assert [v for _, v in chunks] == [2, 2, 1] and all(c.shape[0] == 2 for c, _ in chunks)
    assert chunks[-1][0][1].sum() == 0


def test_scan_reports_fingerprint_changes(tmp_path):
    root = write_identity_folder(tmp_path / "ids")
    before = scan_identity_folder(root).fingerprint()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "person00" / "0009.png")
    assert scan_identity_folder(root).fingerprint() != before
