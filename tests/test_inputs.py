"""Bad and unusual inputs found by an adversarial audit: each is read right, or refused with one
clear line naming the file or flag, or handled by a documented decision that is logged."""

from __future__ import annotations

import io
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import PYTHON, ROOT, subprocess_env
from PIL import Image

from jaxdesens.data import DataError, read_identity_folder
from jaxdesens.data.images import load_image


def face_like(height: int = 60, width: int = 40, seed: int = 0) -> np.ndarray:
    """An RGB image with no symmetry (so any rotation or flip shows) and no zero pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([40 + 3 * y, 30 + 4 * x, 60 + 2 * (x + y)], -1) % 200 + 20
    return np.clip(base + rng.integers(-10, 10, base.shape), 1, 255).astype(np.uint8)


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


# ------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    """A phone photo stored sideways with Orientation=6 reads upright, as every viewer shows it."""
    upright = face_like()
    # Orientation 6: the viewer turns the stored pixels 90 degrees clockwise to show them
    stored = np.rot90(upright, 1)
    options = {"quality": 95} if suffix == ".jpg" else {}
    Image.fromarray(stored).save(tmp_path / f"sideways{suffix}", exif=exif_orientation(6), **options)
    Image.fromarray(upright).save(tmp_path / f"upright{suffix}", **options)
    read = load_image(tmp_path / f"sideways{suffix}", 32).astype(int)
    reference = load_image(tmp_path / f"upright{suffix}", 32).astype(int)
    wrong = load_image(tmp_path / f"upright{suffix}", 32)[::-1].transpose(1, 0, 2).astype(int)
    tolerance = 0 if suffix == ".png" else 4
    assert np.abs(read - reference).mean() <= tolerance
    assert np.abs(wrong - reference).mean() > 20  # the check could fail: sideways differs


def test_exif_orientation_in_the_training_loader(tmp_path):
    for person in ("a", "b"):
        (tmp_path / "faces" / person).mkdir(parents=True)
        Image.fromarray(face_like(seed=1)).save(tmp_path / "faces" / person / "up.png")
        Image.fromarray(np.rot90(face_like(seed=1), -1)).save(tmp_path / "faces" / person / "turned.png",
                                                              exif=exif_orientation(8))
    dataset = read_identity_folder(tmp_path / "faces", 24)
    assert np.array_equal(dataset.images[0], dataset.images[1])


@pytest.mark.parametrize("bits", [16, 12])
def test_sixteen_bit_greyscale_png_keeps_its_grey_levels(tmp_path, bits):
    grey = face_like()[..., 0]
    top = 2 ** bits - 1
    values = np.round(grey.astype(np.float64) * top / 255).astype(np.uint16)  # 12-bit: max 4095
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I;16")  # the file really is 16-bit
    read = load_image(tmp_path / "deep.png", 40, channels=1)[..., 0]
    Image.fromarray(grey).save(tmp_path / "eight.png")
    expected = load_image(tmp_path / "eight.png", 40, channels=1)[..., 0]
    assert np.abs(read.astype(int) - expected.astype(int)).max() <= 1
    assert read.std() > 10  # not a solid image


def test_fully_transparent_rgba_is_refused_and_alpha_is_applied(tmp_path):
    pixels = face_like()
    rgba = np.concatenate([pixels, np.zeros(pixels.shape[:2] + (1,), np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "invisible.png")
    with pytest.raises(DataError, match="invisible.png.*transparent"):
        load_image(tmp_path / "invisible.png", 32)
    half = rgba.copy()
    half[:, :20, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(half).save(tmp_path / "half.png")
    read = load_image(tmp_path / "half.png", 40)
    assert (read[:, 20:] == 0).all() and (read[:, :20] > 0).all()


def test_tiny_images_are_refused(tmp_path):
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(tmp_path / "dot.png")
    with pytest.raises(DataError, match="dot.png.*1x1.*at least"):
        load_image(tmp_path / "dot.png", 32)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG signature and IHDR claiming `width` x `height` (8-bit grey), one empty IDAT:
    enough for a decoder to read the size, the way a decompression bomb announces itself."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [10_000, 20_000])  # over Pillow's limit (89.5 Mpx), and over twice it
def test_decompression_bomb_names_the_file(tmp_path, side):
    png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(DataError, match=r"bomb.png: .*over the decompression-bomb limit"):
        load_image(tmp_path / "bomb.png", 32)


@pytest.mark.slow
def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """A 64-Mpx JPEG is decoded by the JPEG decoder at 1/8 scale when the target is small, so it
    costs a few MB instead of the ~190 MB of its full RGB raster (plus copies)."""
    Image.new("RGB", (8000, 8000), (120, 90, 60)).save(tmp_path / "big.jpg", quality=80)
    probe = ("import resource, sys; from jaxdesens.data.images import load_image; "
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
             "x = load_image(sys.argv[1], 112) if sys.argv[1] != '-' else None; "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    grown = subprocess.run([PYTHON, "-c", probe, str(tmp_path / "big.jpg")], env=subprocess_env(),
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert grown.returncode == 0, grown.stderr
    assert int(grown.stdout) < 40_000  # kB of peak memory added by decoding it


def test_jpeg_draft_keeps_the_picture(tmp_path):
    """The reduced-scale decode gives (nearly) the same small image as a full decode."""
    big = np.asarray(Image.fromarray(face_like(60, 40)).resize((1200, 1800), Image.Resampling.BICUBIC))
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="JPEG", quality=95)
    (tmp_path / "big.jpg").write_bytes(buffer.getvalue())
    Image.fromarray(big).save(tmp_path / "big.png")
    jpeg, png = load_image(tmp_path / "big.jpg", 40).astype(int), load_image(tmp_path / "big.png", 40).astype(int)
    assert np.abs(jpeg - png).mean() < 3


# ------------------------------------------------------------------------------------ LFW pairs
def write_pairs(tmp_path: Path, matched: list[str], mismatched: list[str]) -> Path:
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join([f"1\t{len(matched)}", *matched, *mismatched]) + "\n")
    return path


def test_lfw_mismatched_line_naming_one_person_twice_is_refused(tmp_path):
    from jaxdesens.data.lfw import parse_pairs

    path = write_pairs(tmp_path, ["Ann\t1\t2", "Bob\t1\t3"], ["Ann\t1\tBob\t2", "Cid\t1\tCid\t2"])
    with pytest.raises(DataError, match=r"pairs.txt:5: .*mismatched.*'Cid' twice"):
        parse_pairs(path)


def test_lfw_matched_line_naming_one_image_twice_is_refused(tmp_path):
    from jaxdesens.data.lfw import parse_pairs

    path = write_pairs(tmp_path, ["Ann\t1\t2", "Bob\t3\t3"], ["Ann\t1\tBob\t2", "Cid\t1\tDan\t2"])
    with pytest.raises(DataError, match=r"pairs.txt:3: .*same image.*Bob.*3"):
        parse_pairs(path)


@pytest.mark.parametrize("name", ["../Outside", "..", ".", "a/b", "/etc", "a\\b"])
def test_lfw_names_that_leave_the_root_are_refused(tmp_path, name):
    from jaxdesens.data.lfw import lfw_image_path, parse_pairs

    path = write_pairs(tmp_path, ["Ann\t1\t2"], [f"{name}\t1\tAnn\t2"])
    with pytest.raises(DataError, match=r"pairs.txt:3: .*not a plain LFW name"):
        parse_pairs(path)
    if name in ("../Outside", "..", "/etc"):  # the reader refuses them too, whoever parsed the pairs
        with pytest.raises(DataError, match="outside --lfw_root"):
            lfw_image_path(tmp_path / "lfw", name, 1)


# ------------------------------------------------------------------------------------- workdirs
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (a random init, no training): which one a
    reader restored shows in its `step`."""
    import jax

    from jaxdesens.config import TrainConfig
    from jaxdesens.data import split_identities
    from jaxdesens.train import build_model, create_train_state, load_data
    from jaxdesens.workdir import RunDirectory

    path = tmp_path_factory.mktemp("ckpt") / "run"
    # test_evaluate's tiny config (the same shapes hit the same compiled init in the shared cache)
    config = TrainConfig(model="resnet", width=0.125, image_size=32, synthetic_identities=12,
                         synthetic_images_per_identity=4, holdout=0.5, steps=4, checkpoint_every=2)
    dataset = load_data(config)
    train_set, _ = split_identities(dataset, config.holdout, config.split_seed)
    run = RunDirectory(path)
    run.claim(config, data_fingerprint=dataset.fingerprint, mask_fingerprint=None, num_classes=train_set.num_classes)
    model = build_model(config, train_set.num_classes)
    state = create_train_state(config, model, jax.random.key(0), train_set.image_shape)
    run.save(2, state.replace(step=2))
    run.save(4, state.replace(step=4, params=jax.tree.map(lambda x: x + 1, state.params)))
    run.wait()
    return path


@pytest.fixture()
def workdir(two_checkpoints, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(two_checkpoints, tmp_path / "run"))


def test_missing_final_checkpoint_is_refused_not_replaced(workdir):
    import shutil

    from jaxdesens.recognizer import load_recognizer

    shutil.rmtree(workdir / "checkpoints" / "4")
    with pytest.raises(DataError, match=r"4 steps.*newest checkpoint is step 2"):
        load_recognizer(workdir)


def test_corrupted_final_checkpoint_names_the_folder(workdir):
    from jaxdesens.recognizer import load_recognizer

    (workdir / "checkpoints" / "4" / "default" / "_METADATA").write_text("")
    with pytest.raises(DataError, match=r"checkpoints/4: .*cannot be restored") as info:
        load_recognizer(workdir)
    assert "\n" not in str(info.value)


def test_training_resume_falls_back_past_a_corrupted_newest_checkpoint(workdir):
    import jax

    from jaxdesens.config import TrainConfig
    from jaxdesens.train import build_model, create_train_state
    from jaxdesens.workdir import RunDirectory

    (workdir / "checkpoints" / "4" / "default" / "_METADATA").write_text("")
    config = TrainConfig.from_json(RunDirectory(workdir).read_record()["config"])
    template = create_train_state(config, build_model(config, 6), jax.random.key(9), (32, 32, 3))
    warnings = []
    state = RunDirectory(workdir).restore_or(template, log=warnings.append)
    assert int(state.step) == 2
    assert len(warnings) == 1 and "step 4" in warnings[0] and "broken-checkpoints" in warnings[0]
    assert (workdir / "broken-checkpoints" / "4" / "default").is_dir()  # set aside, not deleted
    assert RunDirectory(workdir).manager.all_steps() == [2]


def test_truncated_run_json_names_the_file(workdir):
    from jaxdesens.recognizer import load_recognizer, read_run_record

    text = (workdir / "run.json").read_text()
    (workdir / "run.json").write_text(text[: len(text) // 2])
    for read in (load_recognizer, read_run_record):
        with pytest.raises(DataError, match=r"run.json: .*truncated"):
            read(workdir)


# ---------------------------------------------------------------------------------- small CLIs
def test_summarize_help_and_missing_folder(tmp_path):
    script = str(ROOT / "benchmarks" / "summarize.py")
    shown = subprocess.run([PYTHON, script, "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert shown.returncode == 0 and "RESULTS_DIR" in shown.stdout and not list(tmp_path.iterdir())
    missing = subprocess.run([PYTHON, script, str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
