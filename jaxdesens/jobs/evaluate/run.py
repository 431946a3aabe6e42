"""The evaluation job end to end: checkpoints and test data in, results.json, report.md and
figures out (see the package docstring for the output folder)."""

from __future__ import annotations

import dataclasses
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdesens.data import DataError, IdentitySet
from jaxdesens.jobs.evaluate.audit import audit_section, check_restorer_people, write_figure
from jaxdesens.jobs.evaluate.figures import write_figures
from jaxdesens.jobs.evaluate.quality import restoration_attacks, table4_methods
from jaxdesens.jobs.evaluate.report import render_report
from jaxdesens.jobs.evaluate.sets import EvalSet, check_compatible, identity_eval_set, lfw_eval_set
from jaxdesens.jobs.evaluate.settings import EvaluateJob
from jaxdesens.jobs.evaluate.tables import (
    Embedder,
    Model,
    brief,
    pair_report,
    role_labels,
    situations,
    table1_levels,
    table2_baseline,
)
from jaxdesens.masks import load_mask
from jaxdesens.masks.ops import mask_ratio
from jaxdesens.paths import check_output_folder
from jaxdesens.recognizer import load_recognizer, read_run_record


def evaluate_models(models: Sequence[Model], evalset: EvalSet, mask: np.ndarray, job: EvaluateJob,
                    train_set: IdentitySet | None = None, progress: bool = False,
                    log: Callable[[str], None] = print,
                    restore: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                    train_error: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every table and the audit (on `train_set`, the training identities; `restore` is the learned
    restorer; `train_error` why `train_set` could not be read); returns (JSON-ready results,
    in-memory artifacts for the figures)."""
    from tqdm.auto import tqdm

    embed = Embedder(job.flip, job.batch_size)
    ratio = float(mask_ratio(mask))
    seconds: dict[str, float] = {}
    notes: list[str] = []
    device = jax.devices()[0]
    results: dict[str, Any] = {
        "models": [], "data": evalset.describe(), "notes": notes, "seconds": seconds,
        "settings": {**dataclasses.asdict(job), "attack_methods": list(job.attack_methods)},
        "mask": {"path": job.mask, "ratio": ratio},
        "device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()},
        "versions": _versions()}
    artifacts: dict[str, Any] = {}

    t0 = time.perf_counter()
    clean, masked = {}, {}
    for model in tqdm(models, disable=not progress, desc="embedding clean / masked", unit="model"):
        clean[model.label] = embed(model, evalset.images)
        masked[model.label] = embed(model, evalset.images, mask)
    verification = {}
    for model in models:
        config = model.recognizer.config
        results["models"].append({"label": model.label, "role": model.role, "workdir": model.workdir,
                                  "depth": config.depth, "width": config.width, "steps": config.steps,
                                  "fsm_after": config.fsm_after if model.role == "fsm" else None,
                                  "trained_mask": config.mask})
        verification[model.label] = {"clean": pair_report(clean[model.label], clean[model.label], evalset.pairs),
                                     "masked": pair_report(masked[model.label], masked[model.label], evalset.pairs)}
        v = verification[model.label]
        log(f"{model.label}: clean {v['clean']['accuracy']:.4f} +- {v['clean']['accuracy_std']:.4f} "
            f"(AUC {v['clean']['auc']:.4f}), searched mask {v['masked']['accuracy']:.4f}")
    results["verification"] = verification
    seconds["verification"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results["table1"], artifacts["level_examples"] = table1_levels(
        models, evalset, embed, {k: v["clean"] for k, v in verification.items()}, job.repeats, job.seed, progress)
    seconds["table1"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if not any(m.role == "resnet" for m in models):
        results["table2"] = None
        notes.append("Table 2 skipped: the Section 4.2 baseline searches with a clean model (--model=resnet) "
                     "and none was given.")
    elif job.baseline_n == 0:
        results["table2"] = None
        notes.append("Table 2 skipped: --baseline_n=0.")
    elif train_set is None:
        results["table2"] = None
        notes.append("Table 2 skipped: the clean model's training data is not available.")
    else:
        results["table2"], artifacts["baseline"] = table2_baseline(models, evalset, embed, train_set, job, progress,
                                                                   log)
    seconds["table2"] = time.perf_counter() - t0

    results["table3"] = {"ratio": ratio, "models": {m.label: brief(verification[m.label]["masked"]) for m in models}}
    results["table5"] = situations(models, evalset, clean, masked)
    fsm = [m for m in models if m.role == "fsm"]
    results["table7"] = [{"label": m.label, "fsm_after": m.recognizer.config.fsm_after,
                          "accuracy": results["table5"][m.label]["situation1"]["accuracy"]} for m in fsm]

    t0 = time.perf_counter()
    results["table4"] = table4_methods(models, evalset, embed, mask, masked, progress)
    seconds["table4"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    methods = job.attack_methods
    if methods:
        results["attacks"] = restoration_attacks(models, evalset, embed, mask, clean, masked, methods,
                                                 job.attack_images, job.seed, progress)
    else:
        results["attacks"] = None
        notes.append("Restoration attacks skipped: --attacks=none.")
    seconds["attacks"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results["audit"] = None
    if not job.audit:
        notes.append("Re-identification audit skipped: --audit=false.")
    elif train_set is None:
        notes.append("Re-identification audit skipped: the checkpoints' training data is not available"
                     + (f" ({train_error})." if train_error else "."))
    else:
        results["audit"] = audit_section(models, train_set, mask, job, restore, notes, progress, log)
    seconds["audit"] = time.perf_counter() - t0
    return results, artifacts


def _load_restorer(workdir: str, size: int, channels: int):
    """The learned restorer, refused before any work when it was trained on other image shapes."""
    from jaxdesens.privacy.restorer_train import load_restorer

    restorer = load_restorer(workdir)
    if (restorer.config.image_size, restorer.config.channels) != (size, channels):
        raise DataError(f"--restorer={workdir}: trained on {restorer.config.image_size} px, {restorer.config.channels} "
                        f"channel(s); the checkpoints take {size} px, {channels}: train one with --image_size={size}")
    return restorer


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("jaxdesens", "jax", "jaxlib", "flax", "optax", "numpy", "dm-pix", "opencv-python-headless",
                    "scikit-image"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def check_out(job: EvaluateJob, data: str | None) -> Path:
    folders = {"--data": data, "--lfw_root": job.lfw_root, "--test_data": job.test_data}
    return check_output_folder(job.out, {f"{flag}={folder}": folder for flag, folder in folders.items()},
                               [*job.checkpoints, *([job.restorer] if job.restorer else [])])


def default_command(job: EvaluateJob) -> str:
    """A command line equivalent to `job` (used when the caller did not pass the real one)."""
    args = ["python", "launch/evaluate.py"] + [f"--checkpoint={c}" for c in job.checkpoints]
    for field in dataclasses.fields(job):
        value = getattr(job, field.name)
        if field.name != "checkpoints" and value != field.default:
            args.append(f"--{field.name}={value}")
    return shlex.join(args)


def run_evaluate_job(job: EvaluateJob, progress: bool = True, log: Callable[[str], None] = print,
                     command: str | None = None) -> dict[str, Any]:
    from jaxdesens.jobs.search import search_data

    if not job.checkpoints:
        raise ValueError("give at least one --checkpoint=WORKDIR")
    if not job.mask or not job.out:
        raise ValueError("--mask (the searched mask, e.g. from launch/search.py) and --out are required")
    lfw = job.lfw_pairs is not None
    if lfw and job.test_data is not None:
        raise ValueError("give either --lfw_pairs/--lfw_root or --test_data, not both")
    # A separate test set (LFW, or --test_data: identities no model trained on) frees the models
    # from sharing one training split or one training set.
    separate = lfw or job.test_data is not None
    records = [read_run_record(w) for w in job.checkpoints]
    check_compatible(job.checkpoints, records, separate)
    data = job.data if job.data is not None else records[0]["config"].get("data")
    out = check_out(job, data)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    recognizers = [load_recognizer(w) for w in job.checkpoints]
    roles = [r.config.model for r in recognizers]
    labels = role_labels(roles, job.checkpoints)
    models = [Model(label, role, rec, str(Path(w).resolve())) for label, role, rec, w in
              zip(labels, roles, recognizers, job.checkpoints)]
    config = recognizers[0].config
    size, channels = config.image_size, config.channels

    train_set = None
    restorer = _load_restorer(job.restorer, size, channels) if job.audit and job.restorer else None
    need_train = not separate or (job.baseline_n > 0 and "resnet" in roles)
    train_error = None
    if need_train or job.audit:
        clean_first = next((m for m in models if m.role == "resnet"), models[0])
        try:
            train_set, held_out = search_data(clean_first.recognizer, job.data)
        except DataError as err:
            if need_train:  # only the audit needs it: the audit is skipped, with the reason in the report
                hint = " (or pass --baseline_n=0 to skip Table 2)" if separate else ""
                raise DataError(f"{err}{hint}") from err
            train_error = str(err)
            log(f"the checkpoints' training data cannot be read, so the audit is skipped: {err}")
        if restorer is not None and train_set is not None:
            check_restorer_people(restorer.config, train_set.source, clean_first.recognizer.config.holdout,
                                  clean_first.recognizer.config.split_seed)
        for model, record in zip(models, records if not separate else ()):
            classes = model.recognizer.variables["params"]["head"]["kernel"].shape[-1]
            stored = record.get("data_fingerprint")
            if classes != train_set.num_classes or (stored and stored != train_set.fingerprint):
                raise DataError(f"{model.workdir} was trained on other data than {train_set.source} "
                                f"({classes} classes, data fingerprint {stored} vs {train_set.fingerprint}); "
                                "its held-out identities would not be held out")
    if lfw:
        evalset = lfw_eval_set(job.lfw_pairs, job.lfw_root, size, channels)
    elif job.test_data is not None:
        from jaxdesens.data import load_dataset

        test_set = load_dataset(job.test_data, size, channels, progress=progress)
        if test_set.mask is not None:
            raise DataError(f"{job.test_data}: a desensitized export; --test_data needs the clean test images")
        evalset = identity_eval_set(test_set)
        evalset = dataclasses.replace(evalset, kind="test identities")
    else:
        evalset = identity_eval_set(held_out)
    raw_mask = load_mask(job.mask)
    mask = load_mask(job.mask, size)
    log(f"test data: {evalset.kind}, {len(evalset.images)} images of {evalset.identities} identities, "
        f"{len(evalset.pairs)} pairs; models: {', '.join(f'{m.label} ({m.role})' for m in models)}; "
        f"mask hides {mask_ratio(mask):.1%}")

    results, artifacts = evaluate_models(models, evalset, mask, job, train_set, progress, log,
                                         restore=None if restorer is None else restorer.restore,
                                         train_error=train_error)
    results["figures"] = write_figures(out, evalset, mask, artifacts, job.attack_methods, job.examples)
    figure = write_figure(results, out)
    if figure:
        results["figures"].append(figure)
    if raw_mask.shape != mask.shape:
        results["notes"].append(f"the mask file is {raw_mask.shape[0]}x{raw_mask.shape[1]}; resized (nearest) to "
                                f"{size}x{size}")
    results["command"] = command or default_command(job)
    results["settings"]["data"] = data
    results["mask"]["file_shape"] = list(raw_mask.shape)
    results["seconds"]["total"] = time.perf_counter() - start
    from jaxdesens.workdir import write_json_atomic

    write_json_atomic(out / "results.json", results)
    (out / "report.md").write_text(render_report(results))
    log(f"wrote {out / 'report.md'}, {out / 'results.json'} and {', '.join(results['figures'])}")
    return results

