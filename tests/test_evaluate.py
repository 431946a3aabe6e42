"""Evaluation job: table assembly, situation semantics, level buckets, report, LFW mode, bad inputs."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import PYTHON, ROOT, subprocess_env, write_identity_folder
from PIL import Image

from jaxdesens.data import DataError
from jaxdesens.jobs.evaluate import EvaluateJob, run_evaluate_job
from jaxdesens.jobs.evaluate.report import render_report
from jaxdesens.jobs.evaluate.sets import attack_subset, identity_eval_set, lfw_eval_set
from jaxdesens.jobs.evaluate.tables import Embedder, Model, level_masks, role_labels, situations
from jaxdesens.masks import LEVELS
from jaxdesens.metrics.verification import generate_pairs
from jaxdesens.privacy import dlib_face
from jaxdesens.recognizer import Recognizer, load_recognizer

SIZE = 32
TABLES = ("verification", "table1", "table2", "table3", "table4", "table5", "attacks")


def _make_workdir(path: Path, model: str, seed: int, image_size: int = SIZE) -> Path:
    """A random-init (untrained) checkpoint on a tiny synthetic set: a workdir in seconds."""
    from jaxdesens.config import TrainConfig
    from jaxdesens.data import split_identities
    from jaxdesens.state import build_model, create_train_state
    from jaxdesens.train import load_data
    from jaxdesens.workdir import RunDirectory

    config = TrainConfig(model=model, width=0.125, image_size=image_size, synthetic_identities=12,
                         synthetic_images_per_identity=4, holdout=0.5, steps=1, seed=seed)
    dataset = load_data(config)
    train_set, _ = split_identities(dataset, config.holdout, config.split_seed)
    run = RunDirectory(path)
    run.claim(config, data_fingerprint=dataset.fingerprint, mask_fingerprint=None, num_classes=train_set.num_classes)
    run.save(1, create_train_state(config, build_model(config, train_set.num_classes), jax.random.key(seed),
                                   train_set.image_shape))
    run.wait()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_eval")
    workdirs = [_make_workdir(root / name, model, seed) for name, model, seed in
                (("clean", "resnet", 0), ("masked", "mask", 1), ("fsm", "fsm", 2))]
    from jaxdesens.masks import save_mask

    mask = np.ones((SIZE, SIZE), np.float32)
    mask[:, :18] = 0
    mask[10:16, 4:28] = 1
    save_mask(root / "mask", mask)
    return {"root": root, "workdirs": workdirs, "mask_path": root / "mask.png", "mask": mask}


@pytest.fixture(scope="module")
def tiny_run(tiny):
    out = tiny["root"] / "out"
    job = EvaluateJob(checkpoints=tuple(str(w) for w in tiny["workdirs"]), mask=str(tiny["mask_path"]), out=str(out),
                      repeats=2, baseline_n=8, baseline_images=16, attack_images=0, audit_probes=12,
                      audit_attackers="pixels")
    tiny["log"] = []
    with pytest.MonkeyPatch.context() as patch:  # dlib is too slow for this fixture: it is reported missing
        patch.setattr(dlib_face, "unavailable_reason", lambda: "dlib is not installed (test)")
        return (run_evaluate_job(dataclasses.replace(job, audit_attackers="dlib,pixels"), progress=False,
                                 log=tiny["log"].append, command="python launch/evaluate.py --tiny"), out)


def hidden_share(mask: np.ndarray) -> float:
    """The reference ratio: hidden pixels counted."""
    return np.count_nonzero(np.asarray(mask) == 0) / np.asarray(mask).size


def embed_by_hand(recognizer: Recognizer, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The network on `x * m` written out (masks (N, H, W)), the FSM branch fed the same masks."""
    x = images.astype(np.float32) / 255.0 * masks[..., None]
    fsm_mask = masks[..., None] if recognizer.model.fsm_after else None
    return np.asarray(jax.jit(recognizer.model.apply)(recognizer.variables, x, fsm_mask)[1]["embedding"])


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def test_every_table_is_assembled_with_all_models(tiny, tiny_run):
    results, out = tiny_run
    labels = ["resnet", "resnet-mask", "resnet-fsm"]
    assert [m["label"] for m in results["models"]] == labels
    assert [m["role"] for m in results["models"]] == ["resnet", "mask", "fsm"]
    for table in TABLES:
        assert results[table] is not None, table
    rows = results["table1"]["rows"]
    assert [r["level"] for r in rows] == ["None", "0.01-0.1", "0.1-0.2", "0.2-0.3", "0.3-0.4", "0.4-0.5", "0.5-0.6"]
    for row in rows:
        assert set(row["models"]) == set(labels)
        assert all(len(m["runs"]) == (1 if row["range"] is None else 2) for m in row["models"].values())
        assert row["delta"] == pytest.approx(row["models"]["resnet-mask"]["mean"] - row["models"]["resnet"]["mean"])
    assert rows[0]["models"]["resnet"]["mean"] == results["verification"]["resnet"]["clean"]["accuracy"]
    assert [r["level"] for r in results["table2"]["rows"]] == ["0.4-0.5", "0.5-0.6"]
    for row in results["table2"]["rows"]:
        low, high = (float(v) for v in row["level"].split("-"))
        assert low < row["ratio"] <= high and row["candidates"] == 8
        assert all(_finite(v["masked"]["accuracy"]) and _finite(v["inpainted"]["accuracy"])
                   for v in row["models"].values())
    assert results["table3"]["ratio"] == pytest.approx(hidden_share(tiny["mask"]))
    assert results["mask"]["ratio"] == results["table3"]["ratio"]
    assert any(f"mask hides {hidden_share(tiny['mask']):.1%}" in m for m in tiny["log"])
    methods = [(r["method"], r["size"]) for r in results["table4"]["rows"]]
    assert methods == [("mask", None), ("blur", 3), ("blur", 5), ("mosaic", 2), ("mosaic", 5)]
    for row in results["table4"]["rows"]:
        assert 0 < row["dssim_mean"] < 1.5 and _finite(row["psnr_mean"]) and set(row["models"]) == set(labels)
    assert set(results["table4"]["ordering"]) == {"weak", "strong", "holds"}
    # The mask row of Table 4 and Table 3 are Situation 1.
    for label in labels:
        s = results["table5"][label]
        assert results["table4"]["rows"][0]["models"][label] == s["situation1"] == results["table3"]["models"][label]
        assert s["situation3"]["accuracy"] == results["verification"][label]["clean"]["accuracy"]
    attack_rows = [r["name"] for r in results["attacks"]["rows"]]
    assert attack_rows == ["clean (no desensitization)", "masked (no restoration)", "biharmonic", "navier-stokes",
                           "telea"]
    assert results["attacks"]["all_images"] and results["attacks"]["pairs"] == results["data"]["pairs"]
    for row in results["attacks"]["rows"][2:]:
        assert row["psnr_mean"] > results["attacks"]["rows"][1]["psnr_mean"]  # restoring beats leaving holes black
    assert results["table7"] == [{"label": "resnet-fsm", "fsm_after": 3,
                                  "accuracy": results["table5"]["resnet-fsm"]["situation1"]["accuracy"]}]
    assert results["data"]["kind"] == "held-out identities" and results["data"]["identities"] == 6
    assert results["device"]["platform"] and results["versions"]["jax"] == jax.__version__


def test_reported_numbers_are_the_masked_images_recomputed_by_hand(tiny, tiny_run):
    """Verification, Table 1 and Table 4 from embeddings and image metrics written out here."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from jaxdesens.jobs.search import search_data
    from jaxdesens.metrics.verification import verification_report

    results, _ = tiny_run
    recognizers = [load_recognizer(w) for w in tiny["workdirs"]]
    _, held_out = search_data(recognizers[0], None)
    evalset = identity_eval_set(held_out)
    images, pairs, mask = evalset.images, evalset.pairs, tiny["mask"]
    n = len(images)

    def accuracy(embedding: np.ndarray) -> dict:
        return verification_report(embedding[pairs.left], embedding[pairs.right], pairs.issame, pairs.fold)

    for label, recognizer in zip(("resnet", "resnet-mask", "resnet-fsm"), recognizers):
        masked = accuracy(embed_by_hand(recognizer, images, np.broadcast_to(mask, (n, SIZE, SIZE))))
        reported = results["verification"][label]["masked"]
        assert (reported["accuracy"], reported["auc"]) == pytest.approx((masked["accuracy"], masked["auc"]), abs=1e-9)
        clean = results["verification"][label]["clean"]
        assert clean["auc"] != pytest.approx(masked["auc"], abs=1e-6)  # the mask matters: the check can fail
    # Table 1, level 0.5-0.6, first repeat: a different mask per image, regenerated from the seed
    bank = level_masks(jax.random.fold_in(jax.random.key(0), 0), n, SIZE, SIZE)
    fsm_level = accuracy(embed_by_hand(recognizers[2], images, bank[5].astype(np.float32)))
    assert results["table1"]["rows"][6]["models"]["resnet-fsm"]["runs"][0] == pytest.approx(fsm_level["accuracy"])
    # Table 4, mask row: dSSIM = 1 - SSIM and PSNR of the masked test faces, by scikit-image
    x = images.astype(np.float64) / 255.0
    y = x * mask[None, :, :, None]
    ssim = [structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=1.0, channel_axis=-1) for a, b in zip(x, y)]
    psnr = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(x, y)]
    row = results["table4"]["rows"][0]
    assert row["dssim_mean"] == pytest.approx(1 - np.mean(ssim), abs=1e-5)
    assert row["psnr_mean"] == pytest.approx(np.mean(psnr), abs=1e-3)
    assert row["label"] == f"mask (ratio {hidden_share(mask):.1%})"


def _rank1_by_hand(probes: np.ndarray, probe_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray):
    """Nearest gallery photo by cosine similarity, one photo per person (no ties with float embeddings)."""
    p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return float(np.mean(gallery_labels[np.argmax(p @ g.T, axis=1)] == probe_labels))


def _embed_floats(recognizer: Recognizer, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """`embed_by_hand` for [0, 1] float images (the audit's probes are not rounded to uint8)."""
    fsm_mask = masks[..., None] if recognizer.model.fsm_after else None
    return np.asarray(_jitted_apply(recognizer.model)(recognizer.variables, images * masks[..., None],
                                                      fsm_mask)[1]["embedding"])


@functools.cache
def _jitted_apply(model):
    return jax.jit(model.apply)


def _audit_by_hand(recognizers, faces, mask) -> dict[tuple[str, str], float]:
    """Rank-1 of every attacker that needs no restoration, written out: the first two non-gallery
    photos of each person are the probes (12 = 6 people x 2, the cap spread over people)."""
    from jaxdesens.desensitize import gaussian_blur, mosaic
    from jaxdesens.privacy import gallery_split

    labels = faces.labels
    gallery, rest = gallery_split(labels, 1, seed=0)
    probes = np.sort(np.concatenate([rest[labels[rest] == i][:2] for i in range(faces.num_classes)]))
    x = faces.images.astype(np.float32) / 255.0
    ones = np.ones((len(probes), SIZE, SIZE), np.float32)
    conditions = {"clean": (x[probes], ones), "mask:searched": (x[probes] * mask[..., None], None)}
    conditions.update({f"blur:{k}": (np.asarray(gaussian_blur(x[probes], k)), ones) for k in (3, 5)})
    conditions.update({f"mosaic:{b}": (np.asarray(mosaic(x[probes], b)), ones) for b in (2, 5)})
    pixels = lambda images: (lambda f: f - f.mean(1, keepdims=True))(images.reshape(len(images), -1))  # noqa: E731
    found = {}
    for name, (images, masks) in conditions.items():
        masks = np.broadcast_to(mask, ones.shape) if masks is None else masks
        found[("pixels", name)] = _rank1_by_hand(pixels(images), labels[probes], pixels(x[gallery]), labels[gallery])
        for label, recognizer in zip(("resnet-mask", "resnet-fsm"), recognizers[1:]):
            probe_emb = _embed_floats(recognizer, images, masks)
            gallery_emb = _embed_floats(recognizer, x[gallery], np.ones((len(gallery), SIZE, SIZE), np.float32))
            found[(f"recipient:{label}", name)] = _rank1_by_hand(probe_emb, labels[probes], gallery_emb,
                                                                 labels[gallery])
    return found


def test_audit_scores_the_training_identities_with_the_recipient_models_as_written_out(tiny, tiny_run):
    """The audit's faces (the checkpoints' training identities, not the test ones), probes, conditions
    and attackers (mask and FSM checkpoints, never the clean one), by hand. Rank-1 of 12 probes with
    untrained models is too coarse to see whether the FSM branch got the mask: test_privacy_audit's
    recipient test checks that."""
    from jaxdesens.jobs.search import search_data

    results, out = tiny_run
    section = results["audit"]
    audit = section["audit"]
    assert section["people"] == 6 and audit["probes"] == 12 and audit["gallery"]["identities"] == 6
    assert list(audit["attackers"]) == ["pixels", "recipient:resnet-mask", "recipient:resnet-fsm"]
    assert audit["skipped"] == {"dlib": "dlib is not installed (test)"}
    names = [c["name"] for c in audit["conditions"]]
    assert names[:2] == ["clean", "mask:searched"] and names[3:] == ["blur:3", "blur:5", "mosaic:2", "mosaic:5"]
    assert names[2] in {f"mask:searched+{m}" for m in ("biharmonic", "navier-stokes", "telea")}
    assert len(section["restorations"]) == 4  # masked + the three classical methods (--attacks=all)
    recognizers = [load_recognizer(w) for w in tiny["workdirs"]]
    train_set, test_set = search_data(recognizers[0], None)
    reported = {(r["attacker"], r["condition"]): r["rank1"] for r in audit["results"]}
    by_hand = _audit_by_hand(recognizers, train_set, tiny["mask"])
    assert len(by_hand) == 18 and all(reported[k] == pytest.approx(v, abs=1e-9) for k, v in by_hand.items()), \
        {k: (reported[k], v) for k, v in by_hand.items()}
    on_test = _audit_by_hand(recognizers, test_set, tiny["mask"])
    assert any(on_test[k] != pytest.approx(v) for k, v in by_hand.items())  # the check tells the two sets apart
    # the figure: per desensitization, the best model's Table 4 accuracy against the worst attacker's rank-1
    points = {p["name"]: p for p in section["figure"]}
    assert set(points) == {"clean", "mask:searched", "blur:3", "blur:5", "mosaic:2", "mosaic:5"}
    mask_row = results["table4"]["rows"][0]
    assert points["mask:searched"]["utility"] == max(m["accuracy"] for m in mask_row["models"].values())
    assert points["mask:searched"]["reidentification"] == max(v for (a, c), v in reported.items()
                                                             if c.startswith("mask:searched"))
    assert points["clean"]["utility"] == max(v["clean"]["accuracy"] for v in results["verification"].values())
    assert (out / "privacy_utility.png").stat().st_size > 1000 and "privacy_utility.png" in results["figures"]
    report = (out / "report.md").read_text()
    section_md = report.split("## Re-identification audit")[1]
    assert "| mask:searched |" in section_md and "recipient:resnet-fsm rank-1" in section_md
    assert "**Attacker dlib skipped**: dlib is not installed (test)" in section_md
    assert "![privacy against utility](privacy_utility.png)" in section_md


def test_audit_off_or_without_attackers_is_said_in_the_report(tiny, tiny_run, monkeypatch):
    from jaxdesens.jobs.evaluate.audit import audit_section, check_restorer_people
    from jaxdesens.jobs.search import search_data

    results, _ = tiny_run
    off = {**results, "audit": None, "notes": ["Re-identification audit skipped: --audit=false."]}
    assert "Re-identification audit skipped: --audit=false." in render_report(off).split("## Re-identification")[1]
    monkeypatch.setattr(dlib_face, "unavailable_reason", lambda: "dlib is not installed (test)")
    clean = load_recognizer(tiny["workdirs"][0])
    notes: list[str] = []
    job = EvaluateJob(checkpoints=("c",), mask="m", out="o")
    assert audit_section([Model("resnet", "resnet", clean)], search_data(clean, None)[0], tiny["mask"], job, None,
                         notes, log=lambda _: None) is None
    assert notes == ["Re-identification audit skipped: no attacker can run: dlib: dlib is not installed (test)"]
    # a restorer that learned from the people the audit probes is refused
    from types import SimpleNamespace

    restorer = SimpleNamespace(data=None, identities="held_out", holdout=0.25, split_seed=0)
    check_restorer_people(restorer, "synthetic:x", 0.25, 0)
    for bad in ({"identities": "all"}, {"split_seed": 1}):
        with pytest.raises(DataError, match="saw people the audit probes"):
            check_restorer_people(SimpleNamespace(**{**vars(restorer), **bad}), "synthetic:x", 0.25, 0)
    check_restorer_people(SimpleNamespace(**{**vars(restorer), "identities": "all", "data": "/elsewhere"}),
                          "synthetic:x", 0.25, 0)
    with pytest.raises(ValueError, match="--audit_attackers"):
        EvaluateJob(audit_attackers="dlib,arcface")


def test_level_masks_fall_in_their_buckets_and_differ_per_image(tiny_run):
    results, _ = tiny_run
    for row in results["table1"]["rows"][1:]:
        low, high = row["range"]
        assert low < row["ratio_min"] <= row["ratio_max"] <= high, row
    bank = level_masks(jax.random.key(3), 6, SIZE, SIZE)
    assert bank.shape == (len(LEVELS), 6, SIZE, SIZE)
    ratios = np.array([[hidden_share(m) for m in level] for level in bank])
    for (low, high), r in zip(LEVELS, ratios):
        assert ((r > low) & (r <= high)).all()
    assert len({m.tobytes() for m in bank[5]}) == 6  # a different mask per image


def test_outputs_json_report_and_figures(tiny_run):
    results, out = tiny_run
    stored = json.loads((out / "results.json").read_text())
    assert stored["table3"] == json.loads(json.dumps(results["table3"]))
    assert stored["command"] == "python launch/evaluate.py --tiny"
    report = (out / "report.md").read_text()
    for caption in ("## Table 1", "## Table 2", "## Table 3", "## Table 4", "## Table 5", "## Restoration attacks",
                    "python launch/evaluate.py --tiny", "| resnet-fsm |", "93.2%", "89.12%"):
        assert caption in report, caption
    assert "dSSIM(mask) > dSSIM(mosaic) > dSSIM(blur)" in report
    for name in ("examples.png", "levels.png", "baseline.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 3 * SIZE
    assert render_report(stored) == report  # the report is a function of results.json alone


def test_report_notes_a_skipped_baseline(tiny_run):
    results, _ = tiny_run
    skipped = {**results, "table2": None, "notes": ["Table 2 skipped: no clean model was given."]}
    report = render_report(skipped)
    section = report.split("## Table 2")[1].split("## Table 3")[0]
    assert "Table 2 skipped: no clean model was given." in section and "|---" not in section


def _plain_backbone(recognizer: Recognizer) -> Recognizer:
    """The FSM model's backbone without its FSM branch."""
    strip = lambda tree: {k: v for k, v in tree.items() if k != "fsm"}  # noqa: E731
    variables = {k: strip(v) for k, v in recognizer.variables.items()}
    return Recognizer(dataclasses.replace(recognizer.model, fsm_after=None), variables,
                      dataclasses.replace(recognizer.config, model="resnet"))


def test_situation_semantics(tiny):
    from jaxdesens.jobs.search import search_data

    fsm = load_recognizer(tiny["workdirs"][2])
    masked_model = load_recognizer(tiny["workdirs"][1])
    _, held_out = search_data(fsm, None)
    evalset = identity_eval_set(held_out)
    models = [Model("fsm", "fsm", fsm), Model("plain", "resnet", _plain_backbone(fsm)),
              Model("mask", "mask", masked_model)]
    embed = Embedder()
    images = evalset.images
    clean = {m.label: embed(m, images) for m in models}
    ones = {m.label: embed(m, images, np.ones(images.shape[1:3], np.float32)) for m in models}
    masked = {m.label: embed(m, images, tiny["mask"]) for m in models}
    # Situation 3 of an FSM model is its plain backbone on clean images.
    np.testing.assert_allclose(clean["fsm"], clean["plain"], rtol=1e-5, atol=1e-6)
    table = situations(models, evalset, clean, masked)
    assert table["fsm"]["situation3"] == table["plain"]["situation3"]
    # The FSM branch is fed the mask: Situation 1 differs from the backbone on masked pixels.
    assert not np.allclose(masked["fsm"], masked["plain"], atol=1e-4)
    # A mask of all ones is no mask: Situation 1 (and 2) equal Situation 3 for every model.
    for label, row in situations(models, evalset, clean, ones).items():
        np.testing.assert_allclose(ones[label], clean[label], rtol=1e-5, atol=1e-6)
        assert row["situation1"]["accuracy"] == row["situation3"]["accuracy"]
        assert row["situation2"]["accuracy"] == row["situation3"]["accuracy"]
    # Situation 2 pairs a clean query (left) with a masked gallery (right).
    pairs = evalset.pairs
    mixed = situations(models[2:], evalset, clean, masked)["mask"]["situation2"]
    from jaxdesens.metrics.verification import verification_report

    direct = verification_report(clean["mask"][pairs.left], masked["mask"][pairs.right], pairs.issame, pairs.fold)
    assert mixed["accuracy"] == direct["accuracy"] and mixed["auc"] == direct["auc"]


def test_attack_subset_is_balanced_bounded_and_remapped():
    labels = np.repeat(np.arange(20), 5)
    pairs = generate_pairs(labels, None, seed=0)
    indices, sub = attack_subset(pairs, len(labels), 30, seed=0)
    assert len(indices) <= 30 and len(np.unique(indices)) == len(indices)
    assert sub.issame.any() and not sub.issame.all() and len(np.unique(sub.fold)) >= 2
    assert abs(int(sub.issame.sum()) - int((~sub.issame).sum())) <= len(sub) // 2
    assert (labels[indices[sub.left]] == labels[indices[sub.right]]).tolist() == sub.issame.tolist()
    again = attack_subset(pairs, len(labels), 30, seed=0)
    np.testing.assert_array_equal(again[0], indices)
    all_indices, same = attack_subset(pairs, len(labels), 0)
    assert len(all_indices) == len(labels) and same is pairs
    with pytest.raises(ValueError, match="attack_images=2"):
        attack_subset(pairs, len(labels), 2)


def test_role_labels():
    assert role_labels(["resnet", "mask", "fsm"], ["a", "b", "c"]) == ["resnet", "resnet-mask", "resnet-fsm"]
    assert role_labels(["resnet", "fsm", "fsm"], ["a", "runs/fsm_l2", "runs/fsm_l3"]) == ["resnet", "fsm_l2", "fsm_l3"]
    assert role_labels(["mask", "mask"], ["x/run", "y/run"]) == ["run#1", "run#2"]


def _lfw_fixture(tmp_path: Path, lines: list[str]) -> tuple[Path, Path]:
    """A pairs file of the given lines and stand-in images for every name it uses."""
    pairs_path = tmp_path / "pairs.txt"
    pairs_path.write_text("\n".join(lines) + "\n")
    root = tmp_path / "lfw"
    rng = np.random.default_rng(0)
    for line in lines[1:]:
        f = line.split("\t")
        for name, index in ([(f[0], f[1]), (f[0], f[2])] if len(f) == 3 else [(f[0], f[1]), (f[2], f[3])]):
            path = root / name / f"{name}_{int(index):04d}.jpg"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return pairs_path, root


def _real_pairs_lines(lfw_pairs_path: Path, folds: int = 2, per_class: int = 3) -> list[str]:
    """The first `per_class` matched and mismatched lines of the real file's first folds."""
    body = lfw_pairs_path.read_text().splitlines()
    n = int(body[0].split()[1])
    lines = [f"{folds}\t{per_class}"]
    for fold in range(folds):
        start = 1 + fold * 2 * n
        lines += body[start:start + per_class] + body[start + n:start + n + per_class]
    return lines


def test_lfw_mode_with_stand_in_images(tiny, lfw_pairs_path, tmp_path):
    pairs_path, root = _lfw_fixture(tmp_path, _real_pairs_lines(lfw_pairs_path))
    evalset = lfw_eval_set(pairs_path, root, SIZE, 3)
    assert len(evalset.pairs) == 12 and evalset.pairs.issame.sum() == 6
    assert len(evalset.images) == len(list(root.glob("*/*.jpg")))  # each named image decoded once
    # No clean model: Table 2 is skipped with a note, and Table 1 has no delta column.
    job = EvaluateJob(checkpoints=tuple(str(w) for w in tiny["workdirs"][1:]), mask=str(tiny["mask_path"]),
                      out=str(tmp_path / "out"), lfw_pairs=str(pairs_path), lfw_root=str(root), repeats=1,
                      attacks="telea", flip=True)
    results = run_evaluate_job(job, progress=False, log=lambda _: None)
    assert results["data"]["kind"] == "LFW pairs" and results["data"]["pairs"] == 12 and results["data"]["folds"] == 2
    assert results["table2"] is None and any("clean model" in n for n in results["notes"])
    assert results["table1"]["delta"] is None
    assert all(_finite(r["models"]["resnet-fsm"]["mean"]) for r in results["table1"]["rows"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "LFW pairs" in report and "Table 2 skipped" in report and "| δ |" not in report


def test_lfw_synthetic_pairs_file_keeps_its_folds(tmp_path):
    lines = ["2\t2", "A\t1\t2", "B\t1\t2", "A\t1\tB\t1", "C\t1\tA\t2",
             "C\t1\t2", "B\t2\t3", "C\t2\tB\t3", "A\t2\tC\t1"]
    pairs_path, root = _lfw_fixture(tmp_path, lines)
    evalset = lfw_eval_set(pairs_path, root, SIZE, 3)
    assert evalset.pairs.fold.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert evalset.pairs.issame.tolist() == [True, True, False, False] * 2
    assert len(evalset.images) == 7 and evalset.identities == 3  # A1 A2 B1 B2 B3 C1 C2
    # Pair 0 is A_1 vs A_2 and pair 2 is A_1 vs B_1: the same query image slot.
    assert evalset.pairs.left[0] == evalset.pairs.left[2]


def test_bad_inputs_name_the_paths(tiny, tmp_path):
    clean = tiny["workdirs"][0]
    other = tmp_path / "bigger"
    other.mkdir()
    record = json.loads((clean / "run.json").read_text())
    record["config"]["image_size"] = 48
    (other / "run.json").write_text(json.dumps(record))
    job = dict(mask=str(tiny["mask_path"]), out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=f"{re.escape(str(clean))}: 32x32x3.*{re.escape(str(other))}: 48x48x3"):
        run_evaluate_job(EvaluateJob(checkpoints=(str(clean), str(other)), **job), progress=False)
    data = write_identity_folder(tmp_path / "faces", identities=4, per_identity=3)
    with pytest.raises(ValueError, match=re.escape(f"--out={data / 'results'} lies inside --data={data}")):
        run_evaluate_job(EvaluateJob(checkpoints=(str(clean),), mask=job["mask"], out=str(data / "results"),
                                     data=str(data)), progress=False)
    with pytest.raises(ValueError, match=re.escape(f"is the checkpoint workdir {clean}")):
        run_evaluate_job(EvaluateJob(checkpoints=(str(clean),), mask=job["mask"], out=str(clean)), progress=False)
    with pytest.raises(ValueError, match="--attacks: unknown method"):
        EvaluateJob(attacks="telea,rfr-net")
    with pytest.raises(ValueError, match="--lfw_pairs and --lfw_root go together"):
        EvaluateJob(lfw_pairs="pairs.txt")


def test_cli_reports_mismatched_checkpoints_clearly(tiny, tmp_path):
    clean = tiny["workdirs"][0]
    other = tmp_path / "small"
    other.mkdir()
    record = json.loads((clean / "run.json").read_text())
    record["config"]["channels"] = 1
    (other / "run.json").write_text(json.dumps(record))
    proc = subprocess.run([PYTHON, str(ROOT / "launch" / "evaluate.py"), f"--checkpoint={clean}",
                           f"--checkpoint={other}", f"--mask={tiny['mask_path']}", f"--out={tmp_path / 'out'}"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and f"{other}: 32x32x1" in proc.stderr
    missing = subprocess.run([PYTHON, str(ROOT / "launch" / "evaluate.py"), f"--checkpoint={tmp_path / 'nowhere'}",
                              f"--mask={tiny['mask_path']}", f"--out={tmp_path / 'out'}"],
                             capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and f"{tmp_path / 'nowhere'}: not a training workdir" in missing.stderr


@pytest.mark.slow
@pytest.mark.compute_bound
def test_att_end_to_end_every_table(att_clean_workdir, att_mask_workdir, att_fsm_workdir, att_searched_mask,
                                    tmp_path):
    """The paper's orderings on AT&T's held-out identities, with margins set from two measured runs
    (the conftest models, seed 0, and the same recipe with seed 1; 900 pairs, 10 folds, fold std of
    one accuracy 0.02-0.06, per-fold paired differences between models: standard error 0.011-0.016)."""
    out = tmp_path / "eval"
    job = EvaluateJob(checkpoints=(str(att_clean_workdir), str(att_mask_workdir), str(att_fsm_workdir)),
                      mask=str(att_searched_mask), out=str(out), repeats=2, baseline_n=32, attack_images=40,
                      audit_probes=30)
    results = run_evaluate_job(job, progress=False, log=lambda _: None)
    assert results["data"]["identities"] == 10 and results["data"]["images"] == 100
    assert results["table3"]["ratio"] == pytest.approx(hidden_share(np.asarray(Image.open(att_searched_mask))))
    assert results["table3"]["ratio"] >= 0.6 and results["attacks"]["images"] <= 40
    # A trained clean model recognizes clean held-out faces far above chance (measured 0.879; 0.913 and 0.906
    # with the earlier zero-initialised residual branches).
    verification, table5 = results["verification"], results["table5"]
    assert verification["resnet"]["clean"]["accuracy"] > 0.8
    # Table 1: at every hole-ratio level, both mask-trained models beat the clean one (measured gaps
    # 0.24-0.32 now; 0.14-0.32 in two runs with the earlier zero-initialised residual branches).
    for row in results["table1"]["rows"][1:]:
        for label in ("resnet-mask", "resnet-fsm"):
            assert row["models"][label]["mean"] > row["models"]["resnet"]["mean"] + 0.08, (row["level"], label)
    # Table 3 (searched mask): the search spares what the clean model uses, so the clean model loses little
    # under it (measured 0.846-0.857, against 0.51-0.56 under Table 1's random level masks), and the paper's
    # FSM-over-clean ordering does NOT hold here: the FSM and mask models, trained on random level masks,
    # score 0.81-0.84 (two runs, and the same with the clean model's recipe of 240 steps at lr 0.01).
    searched = {label: v["masked"]["accuracy"] for label, v in verification.items()}
    best_level = max(row["models"]["resnet"]["mean"] for row in results["table1"]["rows"][1:])
    assert searched["resnet"] > best_level + 0.15
    assert min(searched["resnet-mask"], searched["resnet-fsm"]) > 0.7
    # Table 5, Situation 2 (clean query, masked gallery): the clean model falls to near chance
    # (measured 0.52; earlier 0.50, 0.56), the mask-trained ones do not (0.76-0.81; earlier 0.79-0.85).
    for label in ("resnet-mask", "resnet-fsm"):
        assert table5[label]["situation2"]["accuracy"] > table5["resnet"]["situation2"]["accuracy"] + 0.15, label
    # Table 4: dSSIM(mask) > dSSIM(mosaic) > dSSIM(blur) at both sizes (measured 0.85 > 0.26 / 0.59 > 0.13 / 0.23).
    assert results["table4"]["ordering"]["holds"], results["table4"]["ordering"]
    # Every inpainting attack restores much of what the mask hid (PSNR 17.7-18.8 dB vs 7.6-8.2 masked).
    masked_psnr = results["attacks"]["rows"][1]["psnr_mean"]
    assert all(row["psnr_mean"] > masked_psnr + 5 for row in results["attacks"]["rows"][2:])
    assert all(_finite(v[c]["accuracy"]) for row in results["table2"]["rows"] for v in row["models"].values()
               for c in ("masked", "inpainted"))
    assert (out / "report.md").exists() and (out / "examples.png").exists()
    # The audit on the 30 training identities, 30 probes (chance 3.3%): dlib (a declared test dependency)
    # names clean faces and loses them under the searched mask (measured 100% and 3.3%); the recipient's
    # own models, trained on masked faces, still name masked probes far above chance and above dlib
    # (measured 30% resnet-mask, 23% resnet-fsm): the insider is the stronger attacker.
    audit = results["audit"]["audit"]
    rank1 = {(r["attacker"], r["condition"]): r["rank1"] for r in audit["results"]}
    assert audit["gallery"]["identities"] == 30 and audit["probes"] == 30 and not audit["skipped"]
    assert set(audit["attackers"]) == {"dlib", "recipient:resnet-mask", "recipient:resnet-fsm"}
    assert rank1[("dlib", "clean")] >= 0.8 and rank1[("dlib", "mask:searched")] < rank1[("dlib", "clean")] - 0.4
    insider = max(rank1[(f"recipient:{m}", "mask:searched")] for m in ("resnet-mask", "resnet-fsm"))
    assert insider > 0.1 and insider > rank1[("dlib", "mask:searched")] + 0.1
    assert (out / "privacy_utility.png").exists()
