"""One command from an image set to recognizers trained on its desensitized copy, and one report.

The stages, each in its own folder of the workdir and skipped when already finished (a rerun
resumes; a killed training resumes from its last checkpoint):

  aligned/   with --align: the photos of --data aligned onto the face template (launch/align.py)
  owner/     the owner's split: `train/` identities (desensitized and handed off) and `test/`
             identities (kept back, never trained on by any model), plus the owner's key
  clean/     resnet trained on owner/train            (the clean model Algorithm 1 needs)
  search/    EBP template + Algorithm 1 -> mask.png
  export/    launch/desensitize.py of owner/train with the mask (what leaves the building)
  resnet-mask/         resnet-mask trained on the export (the searched mask: paper Table 3)
  resnet-mask-levels/  resnet-mask trained on owner/train under random hole-ratio-level masks
                       (the paper's Section 4.2 model of Tables 1-2)
  fsm/       resnet-fsm trained on the export
  fsm_l{k}/  resnet-fsm with the FSM after layer k   (Table 7, presets that ask for it)
  threshold_T{t}/  search + mask/fsm training at threshold t (Table 8, presets that ask for it)
  no_ebp/    the search without the template          (ablation, paper Table 6)
  evaluate/  launch/evaluate.py of clean, mask and fsm on owner/test (Tables 1-5, attacks)
  report.md, report.json, timings.json   everything above in one place
To redo a stage, delete its folder and the folders of the stages after it.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxdesens.config import TrainConfig
from jaxdesens.data import IdentitySet, load_dataset, make_synthetic, scan_identity_folder
from jaxdesens.data.splits import held_out_indices
from jaxdesens.data.synthetic import SyntheticConfig
from jaxdesens.masks.ops import apply_mask, mask_ratio
from jaxdesens.paths import is_inside
from jaxdesens.search import OBJECTIVES
from jaxdesens.workdir import write_json_atomic

LOSS_NAMES = {"ce": "CE", "verification": "pair error"}  # the search objective's loss term, in the report
# What every CPU preset trains with: TrainConfig's defaults where the pipeline agrees with them
# (64 px and lr 0.01: at 48 px or lr 0.1 the EBP template drifts off the face; README, "Search").
CPU_TRAIN = TrainConfig(steps=300, holdout=0.2, synthetic_identities=64, synthetic_images_per_identity=10)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of every stage; `fsm_points` beyond 3 and `thresholds` add the Table 7/8 ablations.

    `train` is the TrainConfig every model of the pipeline starts from (each stage sets its mode,
    data and seed), so the training settings and their defaults live in one place, `TrainConfig`;
    its synthetic-set fields also size the synthetic faces written when no --data is given.
    """

    train: TrainConfig = CPU_TRAIN
    test_share: float = 0.25
    search_n: int = 256
    K: int = 32
    T: float = 0.5
    batch_images: int | None = None  # the search's default for its objective
    min_ratio: float = 0.6
    repeats: int = 2
    baseline_n: int = 32
    attack_images: int = 32
    attacks: str = "navier-stokes,telea"
    fsm_points: tuple[int, ...] = (3,)
    thresholds: tuple[float, ...] = ()


PRESETS: dict[str, Preset] = {
    # The README's quick start: minutes on a 2-core CPU.
    "cpu": Preset(),
    # The reproduction report (docs/results.md): every table, still CPU-sized.
    "cpu-full": Preset(train=dataclasses.replace(CPU_TRAIN, steps=400), search_n=512, K=64, repeats=5,
                       baseline_n=100, attack_images=64,
                       attacks="biharmonic,navier-stokes,telea", fsm_points=(1, 2, 3, 4),
                       thresholds=(0.3, 0.4, 0.5, 0.6, 0.7)),
    # The paper's setting on one accelerator.
    "gpu": Preset(train=dataclasses.replace(CPU_TRAIN, image_size=112, depth=34, width=1.0, batch_size=256,
                                            steps=20000, lr=0.01, bf16=True),
                  search_n=2000, K=64, repeats=5, baseline_n=2000, attack_images=200,
                  attacks="biharmonic,navier-stokes,telea", fsm_points=(1, 2, 3, 4),
                  thresholds=(0.3, 0.4, 0.5, 0.6, 0.7)),
}


@dataclasses.dataclass(frozen=True)
class PipelineJob:
    data: str | None = None
    workdir: str = "runs/pipeline"
    preset: str = "cpu"
    seed: int = 0
    align: bool = False

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.align and self.data is None:
            raise ValueError("--align needs --data=PHOTOS (the built-in synthetic faces are aligned already)")

    @property
    def settings(self) -> Preset:
        return PRESETS[self.preset]


def _done(path: Path) -> bool:
    return path.exists()


def _write_identity_folder(dataset: IdentitySet, root: Path, identities: np.ndarray) -> None:
    """Writes the chosen identities of an in-memory set as PNG files (the synthetic default)."""
    from PIL import Image

    for label in identities:
        folder = root / dataset.names[label]
        folder.mkdir(parents=True, exist_ok=True)
        for n, index in enumerate(np.flatnonzero(dataset.labels == label)):
            Image.fromarray(dataset.images[index].squeeze()).save(folder / f"{n + 1:04d}.png")


def owner_split(job: PipelineJob, root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """owner/train and owner/test identity folders (links into --data, or the synthetic set written out)."""
    marker = root / "split.json"
    if _done(marker):
        return json.loads(marker.read_text())
    preset = job.settings
    train = preset.train
    tmp = root.with_name(root.name + ".partial")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    (tmp / "test").mkdir()
    if job.data is None:
        dataset = make_synthetic(SyntheticConfig(train.synthetic_identities, train.synthetic_images_per_identity,
                                                 train.image_size, 3, seed=job.seed))
        names = dataset.names
        kept, held = held_out_indices(len(names), preset.test_share, job.seed, "synthetic faces")
        _write_identity_folder(dataset, tmp / "train", kept)
        _write_identity_folder(dataset, tmp / "test", held)
        source = "synthetic faces"
    else:
        index = scan_identity_folder(job.data)
        names = index.names
        kept, held = held_out_indices(len(names), preset.test_share, job.seed, str(index.root))
        for side, chosen in (("train", kept), ("test", held)):
            for i in chosen:
                (tmp / side / names[i]).symlink_to((index.root / names[i]).resolve(), target_is_directory=True)
        source = str(index.root)
    record = {"source": source, "train_identities": len(kept), "test_identities": len(held),
              "test_share": preset.test_share, "seed": job.seed}
    write_json_atomic(tmp / "split.json", record)
    tmp.rename(root)
    log(f"owner split of {source}: {len(kept)} identities to desensitize and hand off, {len(held)} kept for testing")
    return record


def align_stage(job: PipelineJob, out: Path, log: Callable[[str], None], progress: bool) -> PipelineJob:
    """Aligns --data into `out` (a rerun resumes; a finished one only re-lists) and returns the
    job with `out` as its data, so every later stage reads aligned faces."""
    from jaxdesens.align.folder import AlignJob, run_align

    run_align(AlignJob(data=job.data, out=str(out), size=max(112, job.settings.train.image_size)), progress=progress,
              log=lambda m: log(f"align: {m}"))
    return dataclasses.replace(job, data=str(out))


def train_stage(workdir: Path, config: TrainConfig, log: Callable[[str], None], progress: bool) -> dict[str, Any]:
    """Trains (or resumes, or skips when finished) one recognizer; returns its eval.json."""
    from jaxdesens.train import train_and_evaluate

    if _done(workdir / "eval.json"):
        log(f"{workdir.name}: finished earlier, kept")
        return json.loads((workdir / "eval.json").read_text())
    return train_and_evaluate(config, workdir, progress=progress, log=lambda m: log(f"{workdir.name}: {m}")).evaluation


def search_stage(out: Path, checkpoint: Path, job: PipelineJob, log: Callable[[str], None], progress: bool,
                 **overrides: Any) -> dict[str, Any]:
    from jaxdesens.jobs.search import SearchJob, run_search_job

    if _done(out / "summary.json"):
        log(f"{out.name}: finished earlier, kept")
        return json.loads((out / "summary.json").read_text())
    p = job.settings
    settings = dict(checkpoint=str(checkpoint), out=str(out), n=p.search_n, K=p.K, T=p.T, batch_images=p.batch_images,
                    min_ratio=p.min_ratio, seed=job.seed, bf16=p.train.bf16)
    settings.update(overrides)
    return run_search_job(SearchJob(**settings), progress=progress, log=lambda m: log(f"{out.name}: {m}"))


def export_stage(out: Path, owner: Path, mask: Path, log: Callable[[str], None], progress: bool,
                 check_alignment: bool = True) -> dict[str, Any]:
    """`check_alignment=False` for the built-in synthetic faces: they are drawn on one template."""
    from jaxdesens.desensitize.export import ExportJob, run_export

    if _done(out / "manifest.json"):
        log("export: finished earlier, kept")
        return json.loads((out / "privacy_report.json").read_text())
    export = ExportJob(data=str(owner / "train"), out=str(out), key=str(owner / "owner.key"), mask=str(mask),
                       resume=out.exists(), attack_images=32, owner_log=str(owner / "export.owner-log.json"),
                       check_alignment=check_alignment,
                       audit=False)  # dlib runs once, in the evaluate stage's audit (with the recipient models)
    run_export(export, progress=progress, log=lambda m: log(f"export: {m}"))
    return json.loads((out / "privacy_report.json").read_text())


def model_config(job: PipelineJob, model: str, data: Path, **overrides: Any) -> TrainConfig:
    train = job.settings.train
    values = dict(model=model, data=str(data), seed=job.seed, log_every=max(1, train.steps // 10),
                  checkpoint_every=max(1, train.steps // 4))
    values.update(overrides)
    return dataclasses.replace(train, **values)


def situation_one(workdir: Path, test: IdentitySet, mask: np.ndarray) -> float:
    """Verification accuracy on the owner's test identities with both images under `mask`."""
    from jaxdesens.evaluation import pair_accuracy
    from jaxdesens.metrics.verification import generate_pairs
    from jaxdesens.recognizer import load_recognizer

    pairs = generate_pairs(test.labels, None, seed=0, n_folds=10)
    return float(pair_accuracy(load_recognizer(workdir), test.images, pairs, mask)["accuracy"])


def masked_dssim(test: IdentitySet, mask: np.ndarray) -> float:
    """Mean dSSIM (1 - SSIM) of the test faces under `mask` against the originals."""
    import jax.numpy as jnp

    from jaxdesens.metrics.quality import dssim

    originals = jnp.asarray(test.images, jnp.float32) / 255.0
    return float(jnp.mean(dssim(apply_mask(originals, jnp.asarray(mask)), originals)))


def mask_privacy(test: IdentitySet, mask: np.ndarray, attack_images: int) -> dict[str, float]:
    """Ratio, dSSIM, and PSNR after the Telea inpainting attack (the paper's Table 6 columns)."""
    from jaxdesens.metrics.attacks import restoration_report

    originals = test.images.astype(np.float32) / 255.0
    attack = restoration_report(originals, apply_mask(originals, mask), mask, ("telea",),
                                max_images=attack_images)
    return {"ratio": float(mask_ratio(mask)), "dssim": masked_dssim(test, mask),
            "telea_psnr": float(attack["methods"]["telea"]["psnr_mean"])}


def run_pipeline(job: PipelineJob, progress: bool = True, log: Callable[[str], None] = print,
                 command: str | None = None) -> dict[str, Any]:
    """Runs (or resumes) every stage and writes report.md / report.json in the workdir."""
    from jaxdesens.jobs.evaluate import EvaluateJob, run_evaluate_job
    from jaxdesens.masks.io import load_mask

    root = Path(job.workdir).resolve()
    if job.data is not None and is_inside(root, job.data):
        raise ValueError(f"--workdir={job.workdir} lies inside --data={job.data}; write outputs elsewhere")
    root.mkdir(parents=True, exist_ok=True)
    p = job.settings
    timings_file = root / "timings.json"
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.exists() else {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        """Runs a stage; a stage that finds its results on disk returns at once and keeps the time
        it took when it did run (timings.json), so the report shows real durations after a resume."""
        start = time.perf_counter()
        result = fn()
        elapsed = round(time.perf_counter() - start, 1)
        if elapsed >= 1.0 or name not in timings:
            timings[name] = elapsed
            write_json_atomic(timings_file, timings)
        return result

    owner = root / "owner"
    data_job = stage("align", lambda: align_stage(job, root / "aligned", log, progress)) if job.align else job
    split = stage("owner split", lambda: owner_split(data_job, owner, log))
    clean = stage("clean model", lambda: train_stage(root / "clean", model_config(job, "resnet", owner / "train"),
                                                   log, progress))
    search = stage("search", lambda: search_stage(root / "search", root / "clean", job, log, progress))
    mask_file = root / "search" / "mask.png"
    privacy = stage("export", lambda: export_stage(root / "export", owner, mask_file, log, progress,
                                                   check_alignment=data_job.data is not None))
    trained = {
        "resnet-mask": stage("mask model", lambda: train_stage(
            root / "resnet-mask", model_config(job, "mask", root / "export"), log, progress)),
        "fsm": stage("fsm model", lambda: train_stage(
            root / "fsm", model_config(job, "fsm", root / "export"), log, progress)),
        "resnet-mask-levels": stage("level-mask model", lambda: train_stage(
            root / "resnet-mask-levels", model_config(job, "mask", owner / "train"), log, progress))}
    size = p.train.image_size
    test = load_dataset(owner / "test", size)
    mask = load_mask(mask_file, size)

    ablations: dict[str, Any] = {}
    no_ebp = stage("no-EBP search", lambda: search_stage(root / "no_ebp", root / "clean", job, log, progress,
                                                       without_ebp=True, evaluate=False))
    no_ebp_mask = load_mask(root / "no_ebp" / "mask.png", size)
    ablations["ebp"] = {
        "with_ebp": {**mask_privacy(test, mask, p.attack_images),
                     "clean_accuracy": situation_one(root / "clean", test, mask)},
        "without_ebp": {**mask_privacy(test, no_ebp_mask, p.attack_images),
                        "clean_accuracy": situation_one(root / "clean", test, no_ebp_mask)},
        "objective": {"with_ebp": search["objective"], "without_ebp": no_ebp["objective"]}}
    points = {}
    for layer in p.fsm_points:
        workdir = root / ("fsm" if layer == 3 else f"fsm_l{layer}")
        if layer != 3:
            stage(f"fsm after layer{layer}", lambda: train_stage(
                workdir, model_config(job, "fsm", root / "export", fsm_after=layer), log, progress))
        points[f"layer{layer}"] = situation_one(workdir, test, mask)
    ablations["fsm_points"] = points
    thresholds = {}
    for t in p.thresholds:
        tag = f"threshold_T{t:g}"
        summary = stage(f"search T={t:g}", lambda: search_stage(root / tag / "search", root / "clean", job, log,
                                                               progress, T=t, evaluate=False, adapt_floor=True))
        t_mask_file = root / tag / "search" / "mask.png"
        t_mask = load_mask(t_mask_file, size)
        row = {"template_kept": summary["template_kept"], "ratio": summary["ratio"], "floor": summary["min_ratio"]}
        for model in ("mask", "fsm"):
            stage(f"{model} model T={t:g}", lambda: train_stage(
                root / tag / model, model_config(job, model, owner / "train", mask=str(t_mask_file)), log, progress))
            row[model] = situation_one(root / tag / model, test, t_mask)
        row["dssim"] = masked_dssim(test, t_mask)
        thresholds[f"{t:g}"] = row
    ablations["thresholds"] = thresholds

    evaluate_job = EvaluateJob(
        checkpoints=tuple(str(root / name) for name in ("clean", "resnet-mask-levels", "resnet-mask", "fsm")),
        mask=str(mask_file),
        out=str(root / "evaluate"), data=str(owner / "train"), test_data=str(owner / "test"), repeats=p.repeats,
        baseline_n=p.baseline_n, attack_images=p.attack_images, attacks=p.attacks, seed=job.seed,
        audit_probes=p.attack_images)
    if _done(root / "evaluate" / "report.md"):
        log("evaluate: finished earlier, kept")
    else:
        stage("evaluate", lambda: run_evaluate_job(evaluate_job, progress=progress,
                                                   log=lambda m: log(f"evaluate: {m}")))
    audit = privacy_audit(root)

    report = {"command": command or shlex.join(["python", "launch/pipeline.py"]), "job": dataclasses.asdict(job),
              "preset": dataclasses.asdict(p), "split": split, "training": {"clean": clean, **trained},
              "search": {"loss": search["settings"]["objective"], "scoring_images": search["scoring_images"],
                         **{k: search[k] for k in ("objective", "ce", "pair_error", "ratio", "template_kept",
                                                   "masks_per_s") if k in search}},
              "faithfulness": {k: v for k, v in search.get("faithfulness", {}).items() if not k.endswith("_curve")},
              "privacy": privacy, "privacy_audit": audit, "ablations": ablations, "seconds": timings}
    write_json_atomic(root / "report.json", report)
    (root / "report.md").write_text(render(report, (root / "evaluate" / "report.md").read_text()))

    return report


def privacy_audit(root: Path) -> dict[str, Any]:
    """The evaluation's re-identification audit, drawn as WORKDIR/privacy_utility.png; its points for
    the report. The audited people are the export's (the clean model's training identities): whose
    privacy is at stake, and those the recipient models trained on (the strongest insider); the
    test identities are in no export. Timed inside the evaluate stage (its results' seconds)."""
    from jaxdesens.jobs.evaluate.audit import summary

    return summary(json.loads((root / "evaluate" / "results.json").read_text()), root)


def privacy_lines(privacy: dict[str, Any]) -> list[str]:
    """The export's privacy report as a table: what an inpainting attacker gets back."""
    d = privacy["desensitized_vs_original"]
    lines = ["## Hand-off export (privacy report)", "",
             f"{privacy['images']} images of {privacy['identities']} pseudonymous identities, mask ratio "
             f"{_pct(privacy['mask_ratio'])}; desensitized vs original: dSSIM {d['dssim']['mean']:.3f}, "
             f"PSNR {d['psnr']['mean']:.2f} dB.", "",
             "| restoration attack | PSNR vs original | SSIM vs original |", "|---|---:|---:|"]
    attacks = privacy.get("attacks") or {}
    rows = {"masked (no attack)": attacks.get("masked_baseline"), **attacks.get("methods", {})}
    lines += [f"| {name} | {r['psnr_mean']:.2f} dB | {r['ssim_mean']:.3f} |" for name, r in rows.items() if r]
    return lines


def faithfulness_lines(f: dict[str, Any]) -> list[str]:
    """Does the template sit where the recognizer looks? Occlusion sensitivity is the ground truth."""
    if not f:
        return []
    dele, ins = f["deletion_auc"], f["insertion_auc"]
    return ["## Template faithfulness (occlusion as ground truth)", "",
            f"Mean EBP vs mean occlusion map over {f['images']} images: r = {f['ebp_occlusion_correlation']:.2f}. "
            f"The template keeps {_pct(f['template_area'])} of the pixels and {_pct(f['occlusion_share_in_template'])} "
            f"of the occlusion effect ({f['occlusion_share_over_area']:.2f}x its area share); "
            f"{_pct(f['template_border_share'])} of its pixels lie within 4 px of the border.", "",
            "| order | deletion AUC (higher: faster loss) | insertion AUC (lower: faster recovery) |",
            "|---|---:|---:|",
            *(f"| {k} | {dele[k]:.2f} | {ins[k]:.2f} |" for k in ("ebp", "occlusion", "random")),
            f"(random: mean of smooth random orders; std {f['deletion_auc_random_std']:.2f} / "
            f"{f['insertion_auc_random_std']:.2f})", ""]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def render(report: dict[str, Any], evaluation_md: str) -> str:
    """report.md: the pipeline's own findings (split, stages, privacy, ablations), then the evaluation."""
    from jaxdesens.jobs.evaluate.audit import summary_lines

    p, split, ab = report["preset"], report["split"], report["ablations"]
    t = p["train"]
    lines = ["# jaxdesens pipeline report", "", f"Command: `{report['command']}`", "",
             f"- data: {split['source']}; {split['train_identities']} identities desensitized and handed off, "
             f"{split['test_identities']} kept back as the test set (no model trained on them)",
             f"- preset `{report['job']['preset']}`: ResNet-{t['depth']} width {t['width']}, {t['image_size']} px, "
             f"{t['steps']} steps of {t['batch_size']}, lr {t['lr']}; search n={p['search_n']}, K={p['K']}, "
             f"T={p['T']}, B={report['search']['scoring_images']}, min ratio {p['min_ratio']}", "",
             "## Stages (seconds)", "", "| stage | s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["seconds"].items()]
    s = report["search"]
    lines += ["", "## Searched mask", "",
              f"Objective {s['objective']:.3f} ({LOSS_NAMES[s['loss']]} {s[OBJECTIVES[s['loss']]]:.3f}), hides "
              f"{_pct(s['ratio'])}; the template keeps "
              f"{_pct(s['template_kept'])}.", "", *faithfulness_lines(report["faithfulness"]),
              *privacy_lines(report["privacy"]), "", *summary_lines(report.get("privacy_audit")),
              "## Ablation: search without EBP (paper Table 6)", "",
              "| mask | ratio | clean-model accuracy (Situation 1) | dSSIM | PSNR after Telea |",
              "|---|---:|---:|---:|---:|"]
    for name in ("without_ebp", "with_ebp"):
        r = ab["ebp"][name]
        lines.append(f"| {name.replace('_', ' ')} | {_pct(r['ratio'])} | {_pct(r['clean_accuracy'])} | "
                     f"{r['dssim']:.3f} | {r['telea_psnr']:.2f} dB |")
    lines += ["", "Paper (Table 6, resnet): without EBP 56.1 / 54.3 / 54.2%, PSNR 15.8 / 14.0 / 13.7; "
              "with EBP 56.1 / 55.0 / 53.9%, PSNR 19.3 / 18.6 / 18.4."]
    if len(ab["fsm_points"]) > 1:
        lines += ["", "## FSM insertion point (paper Table 7), Situation 1 on the test identities", "",
                  "| | " + " | ".join(ab["fsm_points"]) + " |", "|---|" + "---:|" * len(ab["fsm_points"]),
                  "| resnet-fsm | " + " | ".join(_pct(v) for v in ab["fsm_points"].values()) + " |",
                  "| paper | 87.36% | 88.73% | 89.12% | 88.92% |"]
    if ab["thresholds"]:
        paper = {"0.3": ("79.4%", "86.42%", "0.76"), "0.4": ("79.8%", "88.6%", "0.77"),
                 "0.5": ("79.78%", "89.12%", "0.81"), "0.6": ("76.05%", "83.68%", "0.78"),
                 "0.7": ("77%", "84.8%", "0.78")}
        lines += ["", "## Threshold T (paper Table 8), Situation 1 on the test identities", "",
                  "Where the template leaves less than the preset's ratio floor to hide, the floor is lowered to 90% "
                  "of what it leaves (column 'floor'). Models are trained on the owner's training identities under "
                  "each T's mask.", "",
                  "| T | template keeps | floor | mask ratio | resnet-mask | resnet-fsm | dSSIM "
                  "| paper mask / fsm / dSSIM |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for t, r in ab["thresholds"].items():
            ref = " / ".join(paper.get(t, ("-", "-", "-")))
            lines.append(f"| {t} | {_pct(r['template_kept'])} | {r['floor']:.2f} | {_pct(r['ratio'])} | "
                         f"{_pct(r['mask'])} | {_pct(r['fsm'])} | {r['dssim']:.3f} | {ref} |")
    lines += ["", "---", "", evaluation_md.replace("# ", "## ", 1)]
    return "\n".join(lines) + "\n"
