"""Applies each wiring bug the tests exist to catch, one at a time, and checks that a test fails.

    python tests/mutations.py [--only NAME ...] [--list] [--json OUT]

Every mutation is a one-line edit of the source (the text it replaces must occur exactly once,
so a refactoring that moves it makes this script fail loudly instead of testing nothing). Each
runs in a scratch copy of the repository (the working tree is never edited) with the real-data
variables unset, so the catching tests are ones that run on any machine. The compilation cache
is shared with the repository's. Exit status 1 if any mutation survives.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


WIRING = "tests/test_wiring.py::"
EVALUATE = "tests/test_evaluate.py::"
MUTATIONS = (
    # masking removed from the train step (the FSM branch still gets the mask)
    Mutation("train step: pixels not masked", "jaxdesens/train.py",
             "    images, fsm_mask = network_inputs(images, mask, use_fsm)\n",
             "    fsm_mask = mask if use_fsm else None\n",
             (WIRING + "test_train_step_loss_is_cross_entropy_of_the_masked_forward_pass",
              WIRING + "test_training_under_a_mask_never_sees_the_hidden_pixels")),
    Mutation("train step: FSM branch not fed the mask", "jaxdesens/train.py",
             "network_inputs(images, mask, use_fsm)", "network_inputs(images, mask, False)",
             (WIRING + "test_train_step_loss_is_cross_entropy_of_the_masked_forward_pass",)),
    # dSSIM halved: the definition and each call site that reports it
    Mutation("dSSIM halved (definition)", "jaxdesens/metrics/quality.py",
             "    return 1.0 - ssim(a, b)", "    return 0.5 * (1.0 - ssim(a, b))",
             ("tests/test_quality.py::test_ssim_psnr_match_skimage",)),
    Mutation("dSSIM halved (Table 4)", "jaxdesens/jobs/evaluate/quality.py",
             "= np.asarray(dssim(x, y))[:valid]", "= 0.5 * np.asarray(dssim(x, y))[:valid]",
             (EVALUATE + "test_reported_numbers_are_the_masked_images_recomputed_by_hand",)),
    Mutation("dSSIM halved (pipeline ablations)", "jaxdesens/jobs/pipeline.py",
             "return float(jnp.mean(dssim(", "return 0.5 * float(jnp.mean(dssim(",
             (WIRING + "test_pipeline_privacy_numbers_are_the_hidden_share_and_dssim",)),
    # the mask ratio inverted: the definition and every call site
    Mutation("ratio inverted (definition)", "jaxdesens/masks/ops.py",
             "    return 1.0 - masks.mean(", "    return masks.mean(",
             ("tests/test_masks.py::test_mask_ratio_is_the_counted_hidden_share",)),
    Mutation("ratio inverted (level buckets)", "jaxdesens/masks/levels.py",
             "    return masks, mask_ratio(masks)", "    return masks, 1 - mask_ratio(masks)",
             ("tests/test_masks.py::test_level_bank_masks_fall_in_their_bucket",)),
    Mutation("ratio inverted (search scoring)", "jaxdesens/search.py",
             "    return mask_ratio(masks)", "    return 1 - mask_ratio(masks)",
             ("tests/test_search.py::test_scores_equal_a_direct_loop",)),
    Mutation("ratio inverted (same-ratio random masks)", "jaxdesens/jobs/search.py",
             "    ratios = mask_ratio(strokes)", "    ratios = 1 - mask_ratio(strokes)",
             (WIRING + "test_same_ratio_random_masks_are_chosen_by_hidden_share",)),
    Mutation("ratio inverted (search summary's random ratios)", "jaxdesens/jobs/search.py",
             '"random_same_ratio_ratios": mask_ratio(random_masks).tolist()',
             '"random_same_ratio_ratios": (1 - mask_ratio(random_masks)).tolist()',
             (WIRING + "test_search_reports_hidden_shares_and_adapts_the_floor_to_the_template",)),
    Mutation("ratio inverted (search floor vs template)", "jaxdesens/jobs/search.py",
             "    hideable = float(mask_ratio(template))", "    hideable = float(1 - mask_ratio(template))",
             (WIRING + "test_search_reports_hidden_shares_and_adapts_the_floor_to_the_template",)),
    Mutation("ratio inverted (training log, fixed mask)", "jaxdesens/train.py",
             "(ratio {mask_ratio(mask):.3f})", "(ratio {1 - mask_ratio(mask):.3f})",
             (WIRING + "test_training_log_reports_the_hidden_share",)),
    Mutation("ratio inverted (training log, export's mask)", "jaxdesens/train.py",
             "(ratio {mask_ratio(dataset.mask):.3f})", "(ratio {1 - mask_ratio(dataset.mask):.3f})",
             (WIRING + "test_training_log_reports_the_hidden_share",)),
    Mutation("ratio inverted (export manifest)", "jaxdesens/desensitize/export.py",
             "round(float(mask_ratio(mask)), 6)", "round(float(1 - mask_ratio(mask)), 6)",
             ("tests/test_export.py::test_manifest_and_privacy_report",)),
    Mutation("ratio inverted (export log, before resizing)", "jaxdesens/desensitize/export.py",
             "        before = mask_ratio(mask)\n", "        before = 1 - mask_ratio(mask)\n",
             (WIRING + "test_export_log_reports_the_hidden_share_before_and_after_resizing",)),
    Mutation("ratio inverted (export log, after resizing)", "jaxdesens/desensitize/export.py",
             'f"{mask_ratio(mask):.3f}")', 'f"{1 - mask_ratio(mask):.3f}")',
             (WIRING + "test_export_log_reports_the_hidden_share_before_and_after_resizing",)),
    Mutation("ratio inverted (Table 1)", "jaxdesens/jobs/evaluate/tables.py",
             "ratios[lv].append(mask_ratio(masks))", "ratios[lv].append(1 - mask_ratio(masks))",
             (EVALUATE + "test_level_masks_fall_in_their_buckets_and_differ_per_image",)),
    Mutation("ratio inverted (Table 2)", "jaxdesens/jobs/evaluate/tables.py",
             '"ratio": float(mask_ratio(mask))', '"ratio": float(1 - mask_ratio(mask))',
             (EVALUATE + "test_every_table_is_assembled_with_all_models",)),
    Mutation("ratio inverted (Table 4 label)", "jaxdesens/jobs/evaluate/quality.py",
             "mask (ratio {mask_ratio(mask):.1%})", "mask (ratio {1 - mask_ratio(mask):.1%})",
             (EVALUATE + "test_reported_numbers_are_the_masked_images_recomputed_by_hand",)),
    Mutation("ratio inverted (Table 3 and results.json)", "jaxdesens/jobs/evaluate/run.py",
             "    ratio = float(mask_ratio(mask))", "    ratio = float(1 - mask_ratio(mask))",
             (EVALUATE + "test_every_table_is_assembled_with_all_models",)),
    Mutation("ratio inverted (evaluation log)", "jaxdesens/jobs/evaluate/run.py",
             "mask hides {mask_ratio(mask):.1%}", "mask hides {1 - mask_ratio(mask):.1%}",
             (EVALUATE + "test_every_table_is_assembled_with_all_models",)),
    Mutation("ratio inverted (pipeline ablations)", "jaxdesens/jobs/pipeline.py",
             '"ratio": float(mask_ratio(mask))', '"ratio": float(1 - mask_ratio(mask))',
             (WIRING + "test_pipeline_privacy_numbers_are_the_hidden_share_and_dssim",)),
    # the evaluation mask dropped: from the embedding, and at each place that embeds under a mask
    Mutation("evaluation mask dropped (embedding pixels)", "jaxdesens/recognizer.py",
             "*network_inputs(images, mask if with_mask else None,", "*network_inputs(images, None,",
             (WIRING + "test_embedding_under_a_mask_is_the_network_on_the_masked_images",
              EVALUATE + "test_reported_numbers_are_the_masked_images_recomputed_by_hand")),
    Mutation("evaluation: FSM branch not fed the mask", "jaxdesens/recognizer.py",
             "model.fsm_after is not None))", "False))",
             (WIRING + "test_embedding_under_a_mask_is_the_network_on_the_masked_images",)),
    Mutation("evaluation mask dropped (verification, Tables 3/5)", "jaxdesens/jobs/evaluate/run.py",
             "masked[model.label] = embed(model, evalset.images, mask)",
             "masked[model.label] = embed(model, evalset.images)",
             (EVALUATE + "test_reported_numbers_are_the_masked_images_recomputed_by_hand",)),
    Mutation("evaluation mask dropped (Table 1)", "jaxdesens/jobs/evaluate/tables.py",
             "emb = embed(model, evalset.images, masks)", "emb = embed(model, evalset.images)",
             (EVALUATE + "test_reported_numbers_are_the_masked_images_recomputed_by_hand",)),
    Mutation("evaluation mask dropped (end of training)", "jaxdesens/evaluation.py",
             "pair_accuracy(recognizer, held_out.images, pairs, np.asarray(mask),",
             "pair_accuracy(recognizer, held_out.images, pairs, None,",
             (WIRING + "test_training_under_a_mask_never_sees_the_hidden_pixels",)),
    Mutation("evaluation mask dropped (pipeline Situation 1)", "jaxdesens/jobs/pipeline.py",
             "pair_accuracy(load_recognizer(workdir), test.images, pairs, mask)",
             "pair_accuracy(load_recognizer(workdir), test.images, pairs)",
             (WIRING + "test_pipeline_situation_one_embeds_the_masked_test_faces",)),
    # FedAvg unweighted with unequal clients
    Mutation("FedAvg unweighted (aggregate)", "jaxdesens/federation/client.py",
             "    weights = counts / counts.sum()", "    weights = jnp.ones_like(counts) / counts.size",
             ("tests/test_federated.py::test_fedavg_weights_each_clients_training_step_by_its_examples",)),
    Mutation("FedAvg unweighted (simulation's counts)", "jaxdesens/federation/simulation.py",
             "np.asarray([len(p) for p in sim.parts], np.float32)", "np.ones(fed.clients, np.float32)",
             ("tests/test_federated.py::test_fedavg_weights_each_clients_training_step_by_its_examples",)),
    # thresholds fitted on the test fold (alone, or with the others)
    Mutation("thresholds fitted on the scored fold", "jaxdesens/metrics/verification.py",
             "best_threshold(scores[fold != f], issame[fold != f])",
             "best_threshold(scores[fold == f], issame[fold == f])",
             ("tests/test_verification.py::test_kfold_random_scores_are_near_chance",
              "tests/test_verification.py::test_kfold_threshold_of_a_fold_ignores_that_fold")),
    Mutation("thresholds fitted on all folds", "jaxdesens/metrics/verification.py",
             "best_threshold(scores[fold != f], issame[fold != f])", "best_threshold(scores, issame)",
             ("tests/test_verification.py::test_kfold_random_scores_are_near_chance",
              "tests/test_verification.py::test_kfold_threshold_of_a_fold_ignores_that_fold")),
    # structure: reading a model reaches up into training again; a preset re-declares a default
    Mutation("recognizer imports train (function level)", "jaxdesens/recognizer.py",
             "    record = read_run_record(workdir)\n    if \"federated\" in record:",
             "    from jaxdesens.train import train_step  # noqa: F401\n\n"
             "    record = read_run_record(workdir)\n    if \"federated\" in record:",
             ("tests/test_structure.py",)),
    Mutation("Preset re-declares a TrainConfig default", "jaxdesens/jobs/pipeline.py",
             "    train: TrainConfig = CPU_TRAIN\n", "    train: TrainConfig = CPU_TRAIN\n    steps: int = 300\n",
             ("tests/test_pipeline.py::test_presets_take_every_training_setting_from_train_config",)),
)


def scratch_copy(target: Path) -> None:
    for name in ("jaxdesens", "tests", "launch", "pyproject.toml"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
        else:
            shutil.copy2(source, target / name)
    (ROOT / ".cache").mkdir(exist_ok=True)
    (target / ".cache").symlink_to(ROOT / ".cache", target_is_directory=True)


def apply(mutation: Mutation, tree: Path) -> None:
    path = tree / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"{mutation.name}: {mutation.path} holds the text to replace {count} times (expected 1); "
                         "update the mutation to the current source")
    path.write_text(text.replace(mutation.old, mutation.new))


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, list[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXDESENS_")}
    env["PYTHONPATH"] = str(tree)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.MULTILINE)
    return result.returncode, failed, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="run mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--baseline", action="store_true",
                        help="first run the chosen mutations' tests on the unmutated code (they must pass)")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or any(o in m.name for o in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path} -> {', '.join(m.tests)}")
        return
    if args.baseline:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        with tempfile.TemporaryDirectory(prefix="mutation-") as scratch:
            scratch_copy(Path(scratch))
            code, failed, seconds = run_tests(Path(scratch), tests)
        print(f"baseline ({len(tests)} test selections, {seconds:.0f} s): "
              + ("passed" if code == 0 else f"pytest exit {code}, failed {failed}"), flush=True)
        if code != 0:
            sys.exit(2)
    results = []
    for mutation in chosen:
        with tempfile.TemporaryDirectory(prefix="mutation-") as scratch:
            tree = Path(scratch)
            scratch_copy(tree)
            apply(mutation, tree)
            code, failed, seconds = run_tests(tree, mutation.tests)
        # pytest exit 1 = some test failed; anything else (passed, collection error) is not a catch
        caught = code == 1 and bool(failed)
        results.append({"mutation": mutation.name, "file": mutation.path, "caught": caught, "failed": failed,
                        "exit": code, "seconds": round(seconds, 1)})
        print(f"{'caught ' if caught else 'SURVIVED'} {mutation.name} ({seconds:.0f} s): "
              f"{', '.join(failed) or f'pytest exit {code}'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    survivors = [r["mutation"] for r in results if not r["caught"]]
    print(f"{len(results) - len(survivors)} of {len(results)} mutations caught" +
          (f"; survived: {survivors}" if survivors else ""))
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
