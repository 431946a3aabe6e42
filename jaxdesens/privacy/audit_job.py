"""The audit as a job (what `launch/audit.py` runs): read faces, build attackers and conditions,
score them, write `audit.json`, `audit.md`, `examples.png` and, given utility numbers, the
privacy-utility figure.

Which faces: by default the identities an export carries, i.e. those `launch/train.py` trains
on (`identities="kept"` with its `holdout` / `split_seed`), so a restorer trained on the held-out
identities never saw the people it attacks. Per person, `gallery_per_identity` seeded clean
photos form the gallery; the other photos, desensitized, are the probes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdesens.data import SyntheticConfig, load_dataset, split_identities
from jaxdesens.data.errors import DataError
from jaxdesens.metrics.attacks import ATTACK_METHODS
from jaxdesens.paths import check_output_folder
from jaxdesens.privacy import dlib_face
from jaxdesens.privacy.attackers import Attacker, PixelAttacker, RecognizerAttacker
from jaxdesens.privacy.audit import Condition, audit_markdown, desensitization_conditions, reidentification_audit
from jaxdesens.privacy.reid import gallery_split
from jaxdesens.workdir import write_json_atomic

ASSUMPTIONS = {
    "threat": "The attacker holds the desensitized probes (and, for a mask export, the mask, which ships with "
              "it), a clean gallery photo of each candidate person, and the recognizers named in the table; it "
              "never holds the probe photos unmasked, nor their identity labels.",
    "dlib": "dlib: faces are aligned, so probes are cut into dlib's 150x150 chip with the mean 5-point landmark "
            "layout of the clean gallery (the detector and landmark predictor run on gallery photos only).",
    "restorer": "The learned restorer was trained on faces of other people (see its workdir's run.json), never on "
                "the probes.",
}

IDENTITIES = ("kept", "held_out", "all")
ATTACKERS = ("dlib", "pixels")


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    out: str
    data: str | None = None
    identities: str = "kept"
    holdout: float = 0.25
    split_seed: int = 0
    image_size: int = 64
    channels: int = 3
    gallery_per_identity: int = 1
    probes_per_identity: int = 0
    masks: tuple[str, ...] = ()
    freeform: tuple[float, ...] = ()
    blur: tuple[int, ...] | None = None
    mosaic: tuple[int, ...] | None = None
    classical: tuple[str, ...] = ATTACK_METHODS
    every_restoration: bool = False
    restorer: str | None = None
    recognizers: tuple[str, ...] = ()
    attackers: tuple[str, ...] = ("dlib",)
    far: float = 1e-3
    seed: int = 0
    utility: str | None = None
    synthetic_identities: int = 96
    synthetic_images_per_identity: int = 12

    def __post_init__(self):
        if self.identities not in IDENTITIES:
            raise ValueError(f"--identities must be one of {'|'.join(IDENTITIES)}, got {self.identities!r}")
        unknown = sorted(set(self.attackers) - set(ATTACKERS))
        if unknown:
            raise ValueError(f"--attackers: unknown {unknown}; expected some of {ATTACKERS} (recipient models "
                             "come with --recognizer)")
        bad = sorted(set(self.classical) - set(ATTACK_METHODS))
        if bad:
            raise ValueError(f"--classical: unknown {bad}; expected some of {ATTACK_METHODS}")
        if not 0 < self.far < 1:
            raise ValueError(f"--far must be in (0, 1), got {self.far}")


def parse_mask_spec(spec: str) -> tuple[str, str]:
    """`LABEL=PATH` or `PATH` (label: the file's folder name, e.g. the search's --out)."""
    label, sep, path = spec.partition("=")
    if not sep:
        path = spec
        label = Path(spec).parent.name or Path(spec).stem
    if not label or not path:
        raise ValueError(f"--mask={spec!r}: expected PATH or LABEL=PATH")
    return label, path


def _faces(config: AuditConfig, progress: bool):
    synthetic = SyntheticConfig(config.synthetic_identities, config.synthetic_images_per_identity,
                                config.image_size, config.channels, seed=0)
    dataset = load_dataset(config.data, config.image_size, config.channels, synthetic, progress=progress)
    if dataset.mask is not None:
        raise DataError(f"{config.data}: is a desensitized export; the audit needs the owner's clean faces")
    if config.identities != "all":
        kept, held_out = split_identities(dataset, config.holdout, seed=config.split_seed)
        dataset = kept if config.identities == "kept" else held_out
    return dataset


def probe_subset(labels: np.ndarray, probes: np.ndarray, per_identity: int = 0, total: int = 0) -> np.ndarray:
    """The first `per_identity` probes of each identity (all with 0), then at most `total` of them
    (all with 0) taken round-robin over identities (every person's first probe, then every
    second...), so a cap spreads over people: fewer descriptors for a quick audit."""
    labels, probes = np.asarray(labels), np.asarray(probes)
    rank = np.zeros(len(probes), np.int64)
    for label in np.unique(labels[probes]):
        members = np.flatnonzero(labels[probes] == label)
        rank[members] = np.arange(len(members))
    keep = rank < per_identity if per_identity > 0 else np.ones(len(probes), bool)
    order = np.lexsort((labels[probes][keep], rank[keep]))
    chosen = probes[keep][order]
    return np.sort(chosen[:total] if total > 0 else chosen)


def _masks(config: AuditConfig) -> dict[str, np.ndarray]:
    from jaxdesens.masks.io import load_mask
    from jaxdesens.privacy.masks import fixed_freeform_mask

    masks = {}
    for spec in config.masks:
        label, path = parse_mask_spec(spec)
        if label in masks:
            raise ValueError(f"--mask label {label!r} given twice; name them LABEL=PATH")
        masks[label] = load_mask(path, config.image_size)
    for hidden in config.freeform:
        masks[f"freeform{round(100 * hidden)}"] = fixed_freeform_mask(config.image_size, hidden, seed=config.seed)
    return masks


def off_the_shelf(names: Sequence[str], log: Callable[[str], None] = print) -> tuple[list[Attacker], dict[str, str]]:
    """The named off-the-shelf attackers that can run, and the reason for each that cannot."""
    attackers, unavailable = [], {}
    for name in names:
        if name == "dlib":
            reason = dlib_face.unavailable_reason()
            if reason is None:
                attackers.append(dlib_face.DlibAttacker())
            else:
                unavailable["dlib"] = reason
                log(f"attacker dlib skipped: {reason}")
        elif name == "pixels":
            attackers.append(PixelAttacker())
        else:
            raise ValueError(f"unknown attacker {name!r}; expected some of {ATTACKERS}")
    return attackers, unavailable


def audit_faces(images: np.ndarray, labels: np.ndarray, masks: dict[str, np.ndarray], *,
                attackers: Sequence[str] = ("dlib",), extra_attackers: Sequence[Attacker] = (),
                blur: Sequence[int] = (), mosaic: Sequence[int] = (), classical: Sequence[str] = ATTACK_METHODS,
                restore: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, every_restoration: bool = False,
                gallery_per_identity: int = 1, probes_per_identity: int = 0, max_probes: int = 0, far: float = 1e-3,
                seed: int = 0, progress: bool = False,
                log: Callable[[str], None] = print) -> tuple[dict[str, Any], list[Condition]]:
    """The whole audit of an in-memory identity set (NHWC uint8 or [0, 1] images, integer labels):
    `({"audit", "restorations"}, conditions)`. What a report calls; `extra_attackers` are e.g.
    `RecognizerAttacker`s of models it already holds. Off-the-shelf attackers that cannot run are
    listed in `audit["skipped"]` with the reason; with no attacker at all it raises DataError.
    `max_probes` caps the probes (0 = all), spread over identities (`probe_subset`)."""
    images = np.asarray(images)
    images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    labels = np.asarray(labels)
    gallery, probes = gallery_split(labels, gallery_per_identity, seed=seed)
    probes = probe_subset(labels, probes, probes_per_identity, max_probes)
    if probes.size == 0:
        raise DataError(f"no identity has more than {gallery_per_identity} image(s); nothing is left to probe with")
    ready, unavailable = off_the_shelf(attackers, log)
    ready += list(extra_attackers)
    if not ready:
        raise DataError("no attacker can run: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    log(f"audit: {len(np.unique(labels))} identities, gallery {len(gallery)}, probes {len(probes)}; attackers: "
        + ", ".join(a.name for a in ready))
    conditions, restorations = desensitization_conditions(images[probes], masks, blur, mosaic, classical, restore,
                                                          every_restoration, progress=progress)
    audit = reidentification_audit(images[gallery], labels[gallery], labels[probes], conditions, ready, far=far,
                                   unavailable=unavailable, progress=progress)
    audit["assumptions"] = [ASSUMPTIONS["threat"]]
    if any(a.name == "dlib" for a in ready):
        audit["assumptions"].append(ASSUMPTIONS["dlib"])
    if restore is not None:
        audit["assumptions"].append(ASSUMPTIONS["restorer"])
    return {"audit": audit, "restorations": restorations}, conditions


def _examples(path: Path, conditions, count: int = 4) -> None:
    from jaxdesens.figures import save_grid

    rows = [[c.probes[i] for c in conditions] for i in np.linspace(0, len(conditions[0].probes) - 1, count).astype(int)]
    save_grid(path, rows, labels=[c.name[:14] for c in conditions])


def run_audit(config: AuditConfig, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the audit and writes its files to `config.out`; returns what audit.json holds."""
    from jaxdesens.desensitize.operators import paper_sizes

    out = check_output_folder(config.out, {"--data": config.data},
                              workdirs=[*config.recognizers, *([config.restorer] if config.restorer else [])])
    masks = _masks(config)
    sizes = paper_sizes(config.image_size)
    blur = sizes["blur"] if config.blur is None else config.blur
    mosaic = sizes["mosaic"] if config.mosaic is None else config.mosaic
    utility = _read_utility(config.utility, {"clean", *(f"mask:{label}" for label in masks),
                                             *(f"blur:{k}" for k in blur), *(f"mosaic:{b}" for b in mosaic)},
                            {*config.attackers, *(f"recipient:{Path(w).name}" for w in config.recognizers)})
    faces = _faces(config, progress)
    restore = None
    if config.restorer:
        from jaxdesens.privacy.restorer_train import load_restorer

        restore = load_restorer(config.restorer).restore
    from jaxdesens.recognizer import load_recognizer  # here: it pulls in the input pipeline, which exports do not need

    recipients = [RecognizerAttacker(load_recognizer(w), name=f"recipient:{Path(w).name}") for w in config.recognizers]
    found, conditions = audit_faces(
        faces.images, faces.labels, masks, attackers=config.attackers, extra_attackers=recipients, blur=blur,
        mosaic=mosaic, classical=config.classical, restore=restore, every_restoration=config.every_restoration,
        gallery_per_identity=config.gallery_per_identity, probes_per_identity=config.probes_per_identity,
        far=config.far, seed=config.seed, progress=progress, log=log)
    audit, restorations = found["audit"], found["restorations"]
    audit["data"] = {"source": faces.source, "identities": faces.num_classes, "which": config.identities,
                     "image_size": config.image_size}
    result = {"settings": dataclasses.asdict(config), **found}
    out.mkdir(parents=True, exist_ok=True)
    _examples(out / "examples.png", conditions)
    markdown = audit_markdown(audit, restorations)
    if utility:
        from jaxdesens.privacy.figure import privacy_utility_figure

        result["figure"] = privacy_utility_figure(audit, utility, out / "privacy_utility.png")
        markdown += "\n![privacy against utility](privacy_utility.png)\n"
    write_json_atomic(out / "audit.json", result)
    _write_text_atomic(out / "audit.md", markdown)
    return result


def _read_utility(path: str | None, conditions: set[str], attackers: set[str] | None = None) -> dict[str, Any]:
    """The utility file (see `figure.py`), every name one of `conditions` and every attacker one of
    `attackers` (when given), so a misspelt name fails before any work is done."""
    from jaxdesens.privacy.figure import utility_entry

    if path is None:
        return {}
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"--utility={path}: cannot read JSON ({err})") from err
    if not isinstance(values, dict):
        raise DataError(f"--utility={path}: expected an object {{condition: accuracy}}, e.g. "
                        '{"clean": 0.87, "mask:search": {"accuracy": 0.82, "attackers": ["dlib", "recipient:fsm"]}}')
    unknown = sorted(set(values) - conditions)
    if unknown:
        raise DataError(f"--utility={path}: names {unknown} are not conditions of this audit; expected some of "
                        f"{sorted(conditions)}")
    for name, value in values.items():
        try:
            named = utility_entry(name, value)[1] or []
        except ValueError as err:
            raise DataError(f"--utility={path}: {err}") from err
        if attackers is not None and set(named) - attackers:
            raise DataError(f"--utility={path}: {name!r} names attackers {sorted(set(named) - attackers)}; this "
                            f"audit has {sorted(attackers)}")
    return values


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def redraw_figure(audit_json: str | Path, utility: str, out: str | Path) -> list[dict[str, Any]]:
    """The figure again from a finished audit.json and a utility file (no attacker runs)."""
    from jaxdesens.privacy.figure import privacy_utility_figure

    inputs = (Path(audit_json).resolve(), Path(utility).resolve())
    if Path(out).suffix.lower() != ".png" or Path(out).resolve() in inputs:
        raise ValueError(f"--out={out}: give a new .png path for the figure (the inputs are never overwritten)")
    try:
        audit = json.loads(Path(audit_json).read_text())["audit"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise DataError(f"{audit_json}: not an audit.json written by launch/audit.py ({err})") from err
    return privacy_utility_figure(audit, _read_utility(utility, {c["base"] for c in audit["conditions"]},
                                                       set(audit["attackers"])), out)
