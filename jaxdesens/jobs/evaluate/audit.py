"""The evaluation's privacy audit: can whoever holds the export name the people in it?

Faces: the checkpoints' **training identities**, the people an export of `--data` carries. They
are whose privacy is at stake, the recipient models were trained on them (the strongest insider:
it may have memorised them), and a learned restorer trains by default on the held-out identities,
so it never saw them. The held-out (test) identities are in no export. One seeded clean photo per
person is the gallery; up to `--audit_probes` of the others, spread over people, are the probes.

Conditions: clean, the searched mask, the mask after its best classical inpainting (among
`--attacks`) and after the learned `--restorer`, blur and mosaic at Table 4's sizes. Attackers:
the off-the-shelf ones (dlib; its absence is reported, never silent) and every mask / FSM
checkpoint as a recipient model (`recipient:<label>`, fed the mask with masked probes). The clean
resnet is the owner's model, trained on clean photos, which no recipient holds: not an attacker.

The figure (`privacy_utility.png`) puts each desensitization's worst re-identification (any
attacker, restorations included) against its utility: the best verification accuracy any
evaluated model reaches on test pairs desensitized that way (Table 4; clean: the clean pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdesens.data import DataError, IdentitySet
from jaxdesens.jobs.evaluate.settings import EvaluateJob
from jaxdesens.jobs.evaluate.tables import Model

MASK_LABEL = "searched"


def check_restorer_people(restorer_config: Any, audit_source: str, holdout: float, split_seed: int) -> None:
    """DataError when the restorer learned from the people the audit probes: the same folder with
    every identity, or split differently from the checkpoints (so the held-out people differ)."""
    synthetic = restorer_config.data is None and audit_source.startswith("synthetic:")
    same = synthetic or (restorer_config.data is not None
                         and Path(restorer_config.data).resolve() == Path(audit_source).resolve())
    split = (restorer_config.holdout, restorer_config.split_seed)
    if same and (restorer_config.identities == "all" or split != (holdout, split_seed)):
        raise DataError(f"--restorer was trained on {audit_source} with --identities={restorer_config.identities}, "
                        f"holdout {split[0]}, split_seed {split[1]}: it saw people the audit probes (the checkpoints' "
                        f"training identities, holdout {holdout}, split_seed {split_seed}); train it with "
                        "--identities=held_out and the checkpoints' --holdout/--split_seed, or on another folder")


def recipient_attackers(models: Sequence[Model], batch_size: int) -> list:
    from jaxdesens.privacy import RecognizerAttacker

    return [RecognizerAttacker(m.recognizer, name=f"recipient:{m.label}", batch_size=batch_size)
            for m in models if m.role in ("mask", "fsm")]


def utility_points(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each audited desensitization's utility: the best accuracy of any evaluated model (Table 4)."""
    best = lambda accuracies: {"accuracy": max(accuracies)}  # noqa: E731
    utility = {"clean": best([v["clean"]["accuracy"] for v in results["verification"].values()])}
    for row in results["table4"]["rows"]:
        name = f"mask:{MASK_LABEL}" if row["method"] == "mask" else f"{row['method']}:{row['size']}"
        utility[name] = best([v["accuracy"] for v in row["models"].values()])
    return utility


def audit_section(models: Sequence[Model], faces: IdentitySet, mask: np.ndarray, job: EvaluateJob,
                  restore: Callable[[np.ndarray, np.ndarray], np.ndarray] | None, notes: list[str],
                  progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The audit on `faces` (the checkpoints' training identities), JSON-ready; None with a note
    in `notes` when it cannot run (no attacker at all, or only desensitized faces)."""
    from jaxdesens.desensitize import paper_sizes
    from jaxdesens.privacy.audit_job import audit_faces

    if faces.mask is not None:
        notes.append(f"Re-identification audit skipped: the checkpoints' training data {faces.source} is a "
                     "desensitized export; the audit needs the owner's clean photos (pass --data=the clean folder).")
        return None
    sizes = paper_sizes(faces.images.shape[1])
    attackers = tuple(a for a in job.audit_attackers.split(",") if a)
    try:
        found, _ = audit_faces(faces.images, faces.labels, {MASK_LABEL: mask}, attackers=attackers,
                               extra_attackers=recipient_attackers(models, job.batch_size), blur=sizes["blur"],
                               mosaic=sizes["mosaic"], classical=job.attack_methods, restore=restore,
                               max_probes=job.audit_probes, seed=job.seed, progress=progress,
                               log=lambda m: log(f"audit: {m}"))
    except DataError as err:
        notes.append(f"Re-identification audit skipped: {err}")
        return None
    return {"identities": "training identities of the checkpoints (the people an export carries)",
            "source": faces.source, "people": faces.num_classes, "restorer": job.restorer, **found}


def write_figure(results: dict[str, Any], out: Path) -> str | None:
    """privacy_utility.png from the audit and Table 4; returns its name (None without an audit)."""
    from jaxdesens.privacy import privacy_utility_figure

    section = results.get("audit")
    if section is None:
        return None
    section["figure"] = privacy_utility_figure(section["audit"], utility_points(results), out / "privacy_utility.png",
                                               title="Privacy against utility (test identities' verification)")
    return "privacy_utility.png"


def audit_lines(results: dict[str, Any]) -> list[str]:
    """The report's audit section: what was audited, the table (`privacy.audit_markdown`), the figure."""
    from jaxdesens.privacy import audit_markdown

    section = results.get("audit")
    if section is None:
        skipped = [n for n in results["notes"] if n.startswith("Re-identification audit skipped")]
        return ["## Re-identification audit", "", *(skipped or ["Not run (--audit=false)."]), ""]
    text = audit_markdown(section["audit"], section["restorations"]).rstrip("\n").split("\n")
    intro = [f"Who holds the export tries to name its people. Faces: the {section['people']} "
             f"{section['identities']}, from `{section['source']}`; one clean gallery photo each, the probes are "
             "other photos of them. Attackers: dlib (off the shelf) and each mask/FSM checkpoint as the recipient's "
             "own model (`recipient:...`); the clean resnet is the owner's model, not an attacker. Rows: the searched "
             "mask (`mask:searched`), after its best classical inpainting and the learned restorer where given, "
             "and blur / mosaic at Table 4's sizes. A cell is rank-1 identification and TAR; lower is more private.",
             ""]
    lines = [text[0], "", *intro, *text[2:], ""]
    if section.get("figure"):
        lines += ["![privacy against utility](privacy_utility.png)", "",
                  "`privacy_utility.png`: per desensitization, the worst rank-1 of any attacker (restorations "
                  "included) against the best verification accuracy any evaluated model reaches on the test pairs "
                  "desensitized that way.", ""]
    return lines


def summary(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """For a report that embeds the evaluation (the pipeline's): privacy_utility.png drawn into
    `out` and, per desensitization, its utility and worst re-identification; JSON-ready."""
    section = results.get("audit")
    if section is None:
        notes = [n for n in results["notes"] if n.startswith("Re-identification audit skipped")]
        return {"figure": None, "note": notes[0] if notes else "Re-identification audit not run."}
    figure = write_figure(results, out)
    audit = section["audit"]
    return {"figure": figure, "people": section["people"], "probes": audit["probes"],
            "chance": audit["results"][0]["rank1_chance"],
            "attackers": list(dict.fromkeys(r["attacker"] for r in audit["results"])),  # in the order they ran
            "skipped": audit["skipped"], "warnings": audit.get("warnings", []), "points": section["figure"]}


def summary_lines(found: dict[str, Any] | None) -> list[str]:
    """The pipeline report's section on `summary`: who was audited, the points, the figure."""
    lines = ["## Who can name the people in the export (re-identification audit)", ""]
    if not found or not found.get("figure"):
        return lines + [(found or {}).get("note", "Not run."), ""]
    lines += [f"Audited: {found['people']} people of the export (training identities of the clean model, all of "
              f"them in the export, which the recipient models trained on); one clean gallery photo each, "
              f"{found['probes']} probes. Attackers: {', '.join(found['attackers'])}"
              + "".join(f"; {name} skipped ({reason})" for name, reason in found["skipped"].items())
              + f". Chance rank-1 {100 * found['chance']:.1f}%. Utility: the best verification accuracy any of the "
              "pipeline's models reaches on the test identities under that desensitization (Table 4).", "",
              "| desensitization | utility | worst re-identification (rank-1, restorations included) |",
              "|---|---:|---:|"]
    lines += [f"| {p['name']} | {100 * p['utility']:.1f}% | {100 * p['reidentification']:.1f}% |"
              for p in found["points"]]
    lines += [""] + [f"**Warning**: {w}." for w in found["warnings"]] + (["" ] if found["warnings"] else [])
    return lines + ["![privacy against utility](privacy_utility.png)", ""]
