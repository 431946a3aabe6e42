"""The audit with real attackers: dlib on AT&T, a recipient's model, the CLI end to end."""

from __future__ import annotations

import json
import subprocess

import jax
import numpy as np
import pytest
from helpers import PYTHON, ROOT, subprocess_env

from jaxdesens.config import TrainConfig
from jaxdesens.data.errors import DataError
from jaxdesens.masks.io import save_mask
from jaxdesens.privacy import Condition, RecognizerAttacker, dlib_face, gallery_split, reidentification_audit
from jaxdesens.privacy.audit_job import AuditConfig, run_audit
from jaxdesens.privacy.restorer_train import RestorerConfig, train_restorer
from jaxdesens.recognizer import Recognizer


@pytest.mark.slow
def test_dlib_names_clean_att_faces_and_nobody_fully_hidden(att_dir):
    """dlib is a declared test dependency (the `test` extra): where it is missing this fails."""
    from jaxdesens.data import read_identity_folder

    assert dlib_face.unavailable_reason() is None, dlib_face.unavailable_reason()
    faces = read_identity_folder(att_dir, 64, 3)
    gallery, probes = gallery_split(faces.labels, 1, seed=0)
    probes = np.concatenate([probes[faces.labels[probes] == i][:2] for i in range(faces.num_classes)])
    images = faces.images.astype(np.float32) / 255
    hidden = np.zeros((64, 64), np.float32)
    conditions = [Condition("clean", None, images[probes]),
                  Condition("mask", "all", images[probes] * 0, mask=hidden, hidden=1.0)]
    audit = reidentification_audit(images[gallery], faces.labels[gallery], faces.labels[probes], conditions,
                                   [dlib_face.DlibAttacker()])
    clean, masked = audit["results"]
    assert clean["rank1_chance"] == pytest.approx(1 / 40) and clean["probes"] == 80
    assert clean["rank1"] >= 0.9, clean
    assert masked["rank1"] == pytest.approx(1 / 40) and masked["tar"] == 0.0, masked
    assert audit["attackers"]["dlib"]["gallery_faces_detected"] >= 36


def _tiny_recognizer(size: int = 32) -> Recognizer:
    from jaxdesens.train import build_model, create_train_state

    config = TrainConfig(model="fsm", width=0.125, image_size=size)
    model = build_model(config, 4)
    state = create_train_state(config, model, jax.random.key(0), (size, size, 3))
    return Recognizer(model, {"params": state.params, "batch_stats": state.batch_stats}, config)


def test_recipient_model_gets_the_mask_with_masked_probes_and_refuses_other_sizes():
    attacker = RecognizerAttacker(_tiny_recognizer(), name="recipient:fsm")
    images = np.random.default_rng(0).uniform(size=(6, 32, 32, 3)).astype(np.float32)
    mask = np.ones((32, 32), np.float32)
    mask[8:, :] = 0
    masked = attacker.embed_probes(images * mask[..., None], mask)
    np.testing.assert_allclose(masked, attacker.recognizer.embed(images, mask=mask), rtol=1e-5, atol=1e-6)
    assert not np.allclose(masked, attacker.embed_probes(images * mask[..., None]), atol=1e-4)  # the FSM sees it
    with pytest.raises(ValueError, match="--image_size=32"):
        attacker.embed_gallery(np.zeros((1, 48, 48, 3), np.float32))


def test_a_missing_dlib_is_reported_not_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(dlib_face, "unavailable_reason", lambda: "dlib is not installed (test); install [faces]")
    config = AuditConfig(out=str(tmp_path / "audit"), image_size=16, synthetic_identities=6,
                         synthetic_images_per_identity=3, identities="all", attackers=("dlib", "pixels"),
                         classical=(), blur=(3,), mosaic=())
    result = run_audit(config, progress=False, log=lambda _: None)
    assert result["audit"]["skipped"] == {"dlib": "dlib is not installed (test); install [faces]"}
    assert "**Attacker dlib skipped**: dlib is not installed (test)" in (tmp_path / "audit" / "audit.md").read_text()
    with pytest.raises(DataError, match="no attacker can run"):
        run_audit(AuditConfig(out=str(tmp_path / "b"), image_size=16, synthetic_identities=6,
                              synthetic_images_per_identity=3, attackers=("dlib",)), progress=False,
                  log=lambda _: None)


@pytest.fixture(scope="module")
def tiny_restorer(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("restorer")
    train_restorer(RestorerConfig(image_size=32, width=4, batch_size=4, steps=2, synthetic_identities=8,
                                  synthetic_images_per_identity=4, freeform_masks=8, level_masks=1),
                   workdir, progress=False, log=lambda _: None)
    return workdir


@pytest.mark.slow
def test_audit_cli_writes_table_figure_and_redraws(tmp_path, tiny_restorer):
    mask = np.ones((32, 32), np.float32)
    mask[10:26, 6:26] = 0
    save_mask(tmp_path / "search" / "mask.png", mask)
    (tmp_path / "utility.json").write_text(json.dumps({"clean": 0.9, "blur:3": 0.85,
                                                       "mask:search": {"accuracy": 0.8, "attackers": ["pixels"]}}))
    out = tmp_path / "audit"
    command = [PYTHON, str(ROOT / "launch" / "audit.py"), f"--out={out}", "--image_size=32", "--identities=held_out",
               "--attackers=pixels", f"--mask={tmp_path / 'search' / 'mask.png'}", "--freeform=0.7",
               "--classical=telea,navier-stokes", "--blur=3", "--mosaic=4", f"--restorer={tiny_restorer}",
               f"--utility={tmp_path / 'utility.json'}", "--progress=false"]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "audit.json").read_text())
    names = [c["name"] for c in saved["audit"]["conditions"]]
    assert names[:4] == ["clean", "mask:search", names[2], "mask:search+learned"]
    assert names[2] in ("mask:search+telea", "mask:search+navier-stokes")
    assert "mask:freeform70" in names and names[-2:] == ["blur:3", "mosaic:4"]
    methods = [(r["mask"], r["method"]) for r in saved["restorations"]]
    assert ("search", "learned") in methods and ("freeform70", "telea") in methods
    assert saved["audit"]["gallery"]["identities"] == 24 and saved["audit"]["probes"] == 24 * 11
    assert {p["name"] for p in saved["figure"]} == {"clean", "mask:search", "blur:3"}
    assert (out / "privacy_utility.png").exists() and (out / "examples.png").exists()
    assert "| mask:search+learned |" in (out / "audit.md").read_text()
    redraw = subprocess.run([PYTHON, str(ROOT / "launch" / "audit.py"), f"--from_audit={out / 'audit.json'}",
                             f"--utility={tmp_path / 'utility.json'}", f"--out={tmp_path / 'again.png'}"],
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert redraw.returncode == 0 and (tmp_path / "again.png").stat().st_size > 1000, redraw.stderr
    (tmp_path / "bad.json").write_text(json.dumps({"mask:serach": 0.8, "clean": {"accuracy": 0.9,
                                                                                 "attackers": ["dlb"]}}))
    bad = subprocess.run([*command[:-2], f"--utility={tmp_path / 'bad.json'}", f"--out={tmp_path / 'bad'}",
                          "--progress=false"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "mask:serach" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_utility_file_errors_name_the_entry_before_any_attack(tmp_path):
    from jaxdesens.privacy.audit_job import _read_utility

    path = tmp_path / "u.json"
    for content, message in [({"clean": {"accuracy": 0.9, "attackers": ["dlb"]}}, r"'clean' names attackers \['dlb'\]"),
                             ({"blur:3": "high"}, "utility of 'blur:3': expected a number"),
                             ({"mosaic:7": 0.8}, r"names \['mosaic:7'\] are not conditions")]:
        path.write_text(json.dumps(content))
        with pytest.raises(DataError, match=message):
            _read_utility(str(path), {"clean", "blur:3"}, {"dlib", "recipient:fsm"})
    path.write_text("{not json")
    with pytest.raises(DataError, match="cannot read JSON"):
        _read_utility(str(path), {"clean"})
