"""Face alignment: AT&T faces pasted on larger photos under random rotations, scales and shifts come
back with their landmarks on the template, as recognisable as the unperturbed faces.

Landmark error is measured with dlib's 68-point model, not the 5-point model the aligner uses, on
identities s21-s40 (the template was measured on s1-s20); verification with dlib's 128-d face
descriptor, an off-the-shelf recognizer trained elsewhere."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import PYTHON, ROOT, subprocess_env
from PIL import Image

from jaxdesens.align.geometry import (
    ARCFACE_TEMPLATE,
    DLIB5_TEMPLATE,
    apply_transform,
    dlib5_points,
    similarity_transform,
    template,
    warp,
)
from jaxdesens.data import DataError

CANVAS = 224
HELD_OUT = range(21, 41)  # identities the template was not measured on


def perturbed_att(att_dir: Path, identities, seed: int = 0):
    """Each AT&T face pasted on a 224x224 grey photo, turned up to 20 degrees, scaled 0.8-1.25
    and shifted up to 20 px: (canvases, their matrices from the original, originals, labels)."""
    rng = np.random.default_rng(seed)
    canvases, matrices, originals, labels = [], [], [], []
    for identity in identities:
        for file in sorted((att_dir / f"s{identity}").glob("*.pgm"), key=lambda p: int(p.stem)):
            face = np.asarray(Image.open(file))
            centre = ((face.shape[1] - 1) / 2, (face.shape[0] - 1) / 2)
            matrix = cv2.getRotationMatrix2D(centre, rng.uniform(-20, 20), rng.uniform(0.8, 1.25))
            matrix[:, 2] += np.array([(CANVAS - 1) / 2 - centre[0], (CANVAS - 1) / 2 - centre[1]])
            matrix[:, 2] += rng.uniform(-20, 20, 2)
            canvases.append(cv2.warpAffine(face, matrix, (CANVAS, CANVAS), flags=cv2.INTER_LINEAR, borderValue=110))
            matrices.append(matrix)
            originals.append(face)
            labels.append(identity)
    return canvases, matrices, originals, np.asarray(labels)


def write_photo_folder(root: Path, canvases, labels) -> Path:
    for n, (canvas, label) in enumerate(zip(canvases, labels)):
        folder = root / f"person{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas).save(folder / f"photo{n:03d}.png")
    return root


# --------------------------------------------------------------------------------- geometry
def test_similarity_transform_matches_skimage():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(0)
    for trial in range(5):
        source = rng.uniform(0, 100, (5, 2))
        target = source @ np.array([[0.7, -0.4], [0.4, 0.7]]).T + [10, -3] + rng.normal(0, 2 * trial, (5, 2))
        if trial == 4:
            target[:, 0] *= -1  # a mirror image: the best rotation, never a reflection
        mine = similarity_transform(source, target)
        reference = SimilarityTransform.from_estimate(source, target).params[:2]
        assert np.allclose(mine, reference, atol=1e-9)
        assert np.linalg.det(mine[:, :2]) > 0


@pytest.mark.parametrize("scale", [0.3, 1.5])  # 0.3 goes through the area-reduction path
def test_warp_moves_a_point_where_the_matrix_says(scale):
    image = np.zeros((400, 400), np.uint8)
    cv2.circle(image, (150, 230), 12, 255, -1)
    matrix = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]) * scale
    matrix = np.hstack([matrix, (np.array([60.0, 50.0]) - matrix @ [150, 230])[:, None]])
    out = warp(image, matrix, 112).astype(np.float64)
    y, x = np.mgrid[0:112, 0:112]
    centroid = np.array([(out * x).sum(), (out * y).sum()]) / out.sum()
    assert np.abs(centroid - apply_transform(matrix, [[150, 230]])[0]).max() < 0.2


def test_template_scales_with_the_output_size():
    assert np.allclose(template(224), 2 * DLIB5_TEMPLATE) and np.allclose(template(112), DLIB5_TEMPLATE)


# ---------------------------------------------------------------------------- real faces
def landmarks68(predictor, detector, image: np.ndarray):
    """ArcFace's five points by dlib's 68-point model (eye contour centres, nose tip, mouth corners)."""
    boxes = detector(image, 1)
    if not boxes:
        return None
    parts = np.array([(p.x, p.y) for p in predictor(image, max(boxes, key=lambda b: b.area())).parts()], float)
    return np.stack([parts[36:42].mean(0), parts[42:48].mean(0), parts[30], parts[48], parts[54]])


@pytest.fixture(scope="module")
def dlib68():
    import dlib

    from jaxdesens.align.faces import model_path

    return dlib.shape_predictor(str(model_path("shape_predictor_68_face_landmarks.dat"))), \
        dlib.get_frontal_face_detector()


def test_template_is_arcface_measured_in_dlib_landmarks(att_dir, dlib68):
    """Re-derives DLIB5_TEMPLATE from AT&T s1-s20 as geometry.py says it was derived."""
    import dlib

    from jaxdesens.align.faces import face_finder

    predictor, _ = dlib68
    finder, placed = face_finder("hog"), []
    for identity in range(1, 21):
        for file in sorted((att_dir / f"s{identity}").glob("*.pgm")):
            image = np.asarray(Image.open(file))
            face = finder.find(image)[0]
            parts = np.array([(p.x, p.y) for p in predictor(image, dlib.rectangle(*face.box)).parts()], float)
            five = np.stack([parts[36:42].mean(0), parts[42:48].mean(0), parts[30], parts[48], parts[54]])
            placed.append(apply_transform(similarity_transform(five, ARCFACE_TEMPLATE), dlib5_points(face.landmarks)))
    assert len(placed) == 200
    assert np.abs(np.mean(placed, 0) - DLIB5_TEMPLATE).max() < 0.006


@pytest.fixture(scope="module")
def aligned_att(att_dir, tmp_path_factory):
    """The held-out identities perturbed, written as a photo folder and aligned by run_align."""
    from jaxdesens.align.folder import AlignJob, run_align

    canvases, matrices, originals, labels = perturbed_att(att_dir, HELD_OUT)
    work = tmp_path_factory.mktemp("align")
    photos = write_photo_folder(work / "photos", canvases, labels)
    summary = run_align(AlignJob(data=str(photos), out=str(work / "aligned")), progress=False, log=lambda _: None)
    record = json.loads(Path(summary["log"]).read_text())["photos"]
    files = sorted(photos.glob("*/*.png"))
    outputs = [np.asarray(Image.open(work / "aligned" / record[str(f)]["output"])) if "output" in record[str(f)]
               else None for f in files]
    return {"work": work, "summary": summary, "canvases": canvases, "matrices": matrices, "originals": originals,
            "labels": labels, "outputs": outputs, "photos": photos}


@pytest.mark.slow
def test_perturbed_faces_come_back_with_landmarks_on_the_template(aligned_att, dlib68):
    from jaxdesens.align.faces import face_finder
    from jaxdesens.align.folder import align_face

    predictor, detector = dlib68
    finder = face_finder("hog")
    summary = aligned_att["summary"]
    assert summary["aligned"] >= 198 and summary["several_faces"] == [] and summary["unreadable"] == []

    def error(images):
        found = [landmarks68(predictor, detector, image) for image in images if image is not None]
        return np.mean([np.linalg.norm(f - ARCFACE_TEMPLATE, axis=1).mean() for f in found if f is not None])

    after = error(aligned_att["outputs"])
    unperturbed = [align_face(o, f[0], 112).pixels for o in aligned_att["originals"] if (f := finder.find(o))]
    reference = error(unperturbed)
    no_alignment = error([cv2.resize(c, (112, 112), interpolation=cv2.INTER_AREA) for c in aligned_att["canvases"]])
    # the perturbation is undone: the original's landmarks reach the same output pixels either way
    undone = []
    for original, matrix, canvas in zip(aligned_att["originals"], aligned_att["matrices"], aligned_att["canvases"]):
        straight, turned, points = finder.find(original), finder.find(canvas), landmarks68(predictor, detector,
                                                                                             original)
        if straight and turned and points is not None:
            direct = align_face(original, straight[0], 112).matrix
            via_canvas = align_face(canvas, turned[0], 112).matrix
            undone.append(np.linalg.norm(apply_transform(direct, points)
                                         - apply_transform(via_canvas, apply_transform(matrix, points)), axis=1).mean())
    print(f"68-point landmarks from ArcFace's template: aligned perturbed {after:.2f} px, aligned unperturbed "
          f"{reference:.2f} px, perturbed unaligned {no_alignment:.2f} px; perturbation undone to "
          f"{np.mean(undone):.2f} px (95th percentile {np.percentile(undone, 95):.2f}) over {len(undone)} faces")
    assert after < 4.0 and after <= reference + 0.25
    assert no_alignment > 3 * after  # the measure can fail
    assert np.mean(undone) < 1.0


@pytest.mark.slow
def test_verification_after_alignment_matches_unperturbed_faces(aligned_att):
    """dlib's 128-d descriptor on chips cut from the written 112-px files by one fixed transform
    (so dlib does not re-align them) against dlib's own pipeline on the unperturbed photos."""
    import dlib

    from jaxdesens.align.faces import face_finder, model_path
    from jaxdesens.metrics.verification import cosine_scores, generate_pairs, kfold_accuracy

    recognizer = dlib.face_recognition_model_v1(str(model_path("dlib_face_recognition_resnet_model_v1.dat")))
    finder = face_finder("hog")
    keep = np.flatnonzero(aligned_att["labels"] >= 31)  # 10 identities, 100 faces: minutes of CPU otherwise
    labels = aligned_att["labels"][keep]
    rgb = lambda image: np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image  # noqa: E731

    def shape(box, points):
        return dlib.full_object_detection(dlib.rectangle(*box), [dlib.point(round(x), round(y)) for x, y in points])

    # dlib's 5 corners where the template puts them: one chip transform for every aligned file
    corners = np.array([(81.92, 53.86), (67.03, 54.05), (29.80, 53.97), (44.50, 54.18), (55.95, 79.53)])
    fixed = shape((0, 0, 111, 111), corners)
    blank = np.zeros((150, 150, 3), np.uint8)
    chips = {"dlib on unperturbed photos": [], "aligned perturbed (ours)": [], "perturbed, not aligned": []}
    for i in keep:
        found = finder.find(aligned_att["originals"][i])
        chips["dlib on unperturbed photos"].append(
            dlib.get_face_chip(rgb(aligned_att["originals"][i]), shape(found[0].box, found[0].landmarks), 150, 0.25)
            if found else blank)
        output = aligned_att["outputs"][i]
        chips["aligned perturbed (ours)"].append(blank if output is None else
                                                 dlib.get_face_chip(rgb(output), fixed, 150, 0.25))
        chips["perturbed, not aligned"].append(cv2.resize(rgb(aligned_att["canvases"][i])[37:187, 37:187], (150, 150)))
    pairs = generate_pairs(labels, None, seed=0)
    accuracy = {}
    for name, images in chips.items():
        embeddings = np.array([np.asarray(recognizer.compute_face_descriptor(c)) for c in images])
        scores = cosine_scores(embeddings[pairs.left], embeddings[pairs.right])
        accuracy[name] = kfold_accuracy(scores, pairs.issame, pairs.fold)
    print({name: f"{a['mean']:.4f} +- {a['std']:.4f}" for name, a in accuracy.items()}, f"{len(pairs)} pairs")
    reference = accuracy["dlib on unperturbed photos"]
    assert accuracy["aligned perturbed (ours)"]["mean"] >= reference["mean"] - max(0.02, 2 * reference["std"])
    assert accuracy["perturbed, not aligned"]["mean"] < reference["mean"] - 0.1  # the measure can fail


def test_faceless_crowded_and_unreadable_photos_are_logged_and_resumed(att_dir, tmp_path):
    from jaxdesens.align.folder import AlignJob, run_align

    canvases, _, _, _ = perturbed_att(att_dir, [21, 22])
    photos = tmp_path / "photos"
    write_photo_folder(photos, canvases[:2], [1, 1])
    write_photo_folder(photos, canvases[10:11], [2])
    noise = np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)
    Image.fromarray(noise).save(photos / "person01" / "no_face.png")
    big = cv2.resize(np.asarray(Image.open(att_dir / "s22" / "1.pgm")), (120, 146))
    pair = np.full((200, 300), 110, np.uint8)
    pair[20:166, 10:130] = big
    pair[40:152, 190:282] = np.asarray(Image.open(att_dir / "s23" / "1.pgm"))  # a smaller face beside it
    Image.fromarray(pair).save(photos / "person02" / "two_faces.png")
    (photos / "person02" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    job = AlignJob(data=str(photos), out=str(tmp_path / "aligned"))
    lines = []
    summary = run_align(job, progress=False, log=lines.append)
    out = tmp_path / "aligned"
    assert summary["aligned"] == 4 and Path(summary["log"]) == tmp_path / "aligned.align-log.json"
    assert [Path(p).name for p in summary["no_face"]] == ["no_face.png"]
    assert [Path(p).name for p in summary["several_faces"]] == ["two_faces.png"]
    assert [Path(p).name for p in summary["unreadable"]] == ["broken.jpg"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "person01/photo000.png", "person01/photo001.png", "person02/photo000.png", "person02/two_faces.png"]
    assert "1 without a face" in lines[-1]
    # the larger face was aligned: the output matches the big face aligned on its own
    alone = pair.copy()
    alone[:, 150:] = 110
    from jaxdesens.align.faces import face_finder
    from jaxdesens.align.folder import align_face

    expected = align_face(alone, face_finder("hog").find(alone)[0], 112).pixels
    assert np.abs(np.asarray(Image.open(out / "person02" / "two_faces.png")).astype(int) - expected).mean() < 2
    # a rerun resumes without redoing anything; other settings are refused
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    lines.clear()
    run_align(job, progress=False, log=lines.append)
    assert lines[0] == "resuming: 6 of 6 photos done earlier" and stamp == {p: p.stat().st_mtime_ns
                                                                           for p in out.rglob("*.png")}
    with pytest.raises(DataError, match="other settings"):
        run_align(AlignJob(data=str(photos), out=str(out), size=96), progress=False, log=lines.append)
    with pytest.raises(DataError, match="inside --data"):
        run_align(AlignJob(data=str(photos), out=str(photos / "x")), progress=False, log=lines.append)


def test_alignment_check_tells_aligned_from_unaligned(aligned_att):
    from jaxdesens.align.check import alignment_warning, landmark_spread

    work = aligned_att["work"]
    aligned = landmark_spread(sorted((work / "aligned").glob("*/*.png")))
    unaligned = landmark_spread(sorted(aligned_att["photos"].glob("*/*.png")))
    print("spread px: aligned", aligned["spread_px"], "unaligned", unaligned["spread_px"])
    assert aligned["aligned"] and alignment_warning(aligned, "A") is None
    assert unaligned["aligned"] is False and "do not look aligned" in alignment_warning(unaligned, "U")
    assert unaligned["spread_px"] > 2 * aligned["spread_px"]


def test_export_warns_on_unaligned_faces(aligned_att, tmp_path):
    from jaxdesens.desensitize.export import ExportJob, run_export
    from jaxdesens.masks import save_mask

    mask = np.zeros((32, 32), np.float32)
    mask[8:20, 4:28] = 1
    save_mask(tmp_path / "mask.png", mask)
    lines = []
    job = ExportJob(data=str(aligned_att["photos"]), out=str(tmp_path / "export"), key=str(tmp_path / "k"),
                    mask=str(tmp_path / "mask.png"), attacks="none", owner_log=str(tmp_path / "owner.json"))
    run_export(job, progress=False, log=lines.append)
    assert any(line.startswith("warning: ") and "do not look aligned" in line for line in lines)
    assert json.loads((tmp_path / "owner.json").read_text())["alignment_check"]["aligned"] is False


def test_missing_dlib_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['dlib'] = None\n"
            "from jaxdesens.align.faces import faces_available; print(faces_available())\n"
            "from jaxdesens.align.check import landmark_spread; print(landmark_spread(['x.png'])['checked'])\n")
    result = subprocess.run([PYTHON, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install 'jaxdesens[faces]'" in result.stdout and result.stdout.strip().endswith("False")
    (tmp_path / "photos" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "photos" / "a" / "1.png")
    cli = subprocess.run([PYTHON, "-c", "import sys, runpy; sys.modules['dlib'] = None; sys.argv = sys.argv[1:]; "
                          "sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]); "
                          "runpy.run_path(sys.argv[0], run_name='__main__')", str(ROOT / "launch" / "align.py"),
                          f"--data={tmp_path / 'photos'}", f"--out={tmp_path / 'out'}"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "pip install 'jaxdesens[faces]'" in cli.stderr and "Traceback" not in cli.stderr


def test_pipeline_align_needs_data():
    from jaxdesens.jobs.pipeline import PipelineJob

    with pytest.raises(ValueError, match="--align needs --data"):
        PipelineJob(align=True)


def test_pipeline_align_stage_hands_aligned_faces_on(att_dir, tmp_path):
    from jaxdesens.jobs.pipeline import PipelineJob, align_stage

    canvases, _, _, labels = perturbed_att(att_dir, [25, 26])
    photos = write_photo_folder(tmp_path / "photos", canvases[::5], labels[::5])
    job = PipelineJob(data=str(photos), workdir=str(tmp_path / "run"), align=True)
    aligned = align_stage(job, tmp_path / "run" / "aligned", log=lambda _: None, progress=False)
    assert aligned.data == str(tmp_path / "run" / "aligned") and aligned.align
    written = sorted(p.relative_to(tmp_path / "run" / "aligned").as_posix()
                     for p in (tmp_path / "run" / "aligned").rglob("*.png"))
    assert written == ["person25/photo000.png", "person25/photo001.png", "person26/photo002.png",
                       "person26/photo003.png"]
    assert Image.open(tmp_path / "run" / "aligned" / written[0]).size == (112, 112)
