"""A resumable work directory: the run's identity, its checkpoints and its metrics.

Layout of a workdir:
  run.json         config, data and mask fingerprints (a resume must match them)
  checkpoints/     Orbax CheckpointManager (atomic: written to a temporary name, then renamed)
  metrics.jsonl    one JSON line per logged step (TensorBoard events in tb/ with tensorboardX)
  eval.json        the final held-out verification
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdesens.config import TrainConfig, config_differences
from jaxdesens.data.errors import DataError


class ResumeError(RuntimeError):
    """The workdir holds a run that is not this one; resuming would mix two experiments."""


def write_json_atomic(path: Path, values: Any) -> None:
    """Writes JSON to a temporary file in the same folder, then renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(values, f, indent=2, sort_keys=True, default=_to_builtin)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _to_builtin(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


class RunDirectory:
    def __init__(self, path: str | Path, keep: int = 2):
        self.path = Path(path).resolve()
        self.keep = keep
        self._manager: ocp.CheckpointManager | None = None

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True)
            self._manager = ocp.CheckpointManager(self.path / "checkpoints", options=options)
        return self._manager

    def claim(self, config: TrainConfig, **identity: Any) -> None:
        """Records what this run is, or refuses if the workdir already holds a different run."""
        self.keep = config.keep_checkpoints
        record = {"config": config.to_json(), **identity}
        stored_path = self.path / "run.json"
        if stored_path.exists():
            stored = self.read_record()
            diffs = config_differences(stored.get("config", {}), record["config"], ignore=TrainConfig.RESUMABLE_FIELDS)
            diffs += config_differences({k: v for k, v in stored.items() if k != "config"},
                                        {k: v for k, v in record.items() if k != "config"})
            if diffs:
                raise ResumeError(f"{self.path} holds a different run; use a new --workdir or the original "
                                  "settings. Differences (stored -> now):\n  " + "\n  ".join(diffs))
        write_json_atomic(stored_path, record)

    def read_record(self) -> dict[str, Any]:
        """run.json, or a one-line error naming it when missing, truncated or not a record."""
        path = self.path / "run.json"
        if not path.is_file():
            raise DataError(f"{self.path}: not a training workdir (no run.json); pass the --workdir of "
                            "launch/train.py or launch/federated.py")
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: unreadable run record ({err}); the file is truncated or damaged: restore it "
                            "or train again in a new --workdir") from err
        if not isinstance(record, dict):
            raise DataError(f"{path}: not a run record (a JSON object with the run's config)")
        return record

    def checkpoint_folder(self, step: int) -> Path:
        return self.path / "checkpoints" / str(step)

    def _restore(self, step: int, state: Any) -> Any:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_or(self, state: Any, log: Callable[[str], None] = print) -> Any:
        """The newest restorable checkpoint in `state`'s structure, or `state` itself (for resuming).

        A newest checkpoint that cannot be restored (a damaged disk, a copy cut short) is moved to
        `broken-checkpoints/` with a warning naming it, and the previous one is used: training
        redoes the steps after it. Nothing is deleted.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self._restore(step, state)
            except Exception as err:  # Orbax/TensorStore raise many types for damaged files
                aside = self.path / "broken-checkpoints" / str(step)
                aside.parent.mkdir(exist_ok=True)
                os.replace(self.checkpoint_folder(step), aside)
                self.manager.reload()
                log(f"warning: checkpoint step {step} ({self.checkpoint_folder(step)}) cannot be restored "
                    f"({_first_line(err)}); moved to {aside}; using the previous checkpoint")
        return state

    def restore_final(self, state: Any, final_step: int) -> Any:
        """The checkpoint of `final_step` (what evaluation reports), or a one-line error: never an
        earlier step in its place."""
        steps = self.manager.all_steps()
        if final_step not in steps:
            newest = f"step {max(steps)}" if steps else "none"
            raise DataError(f"{self.path}: the run was set up for {final_step} steps but its newest checkpoint is "
                            f"{newest} (training unfinished, or its final checkpoint deleted); finish it with "
                            f"launch/train.py --workdir={self.path}")
        try:
            return self._restore(final_step, state)
        except Exception as err:  # Orbax/TensorStore raise many types for damaged files
            raise DataError(f"{self.checkpoint_folder(final_step)}: the final checkpoint cannot be restored "
                            f"({_first_line(err)}); move it away and rerun launch/train.py --workdir={self.path} to "
                            "redo the last steps from the previous checkpoint") from err

    def save(self, step: int, state: Any) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def write_json(self, name: str, values: Any) -> None:
        write_json_atomic(self.path / name, values)


def truncate_jsonl(path: Path, key: str, last: int) -> None:
    """Keeps the lines of a JSON-lines record whose `key` is at most `last` (a resumed run drops
    what it will compute again); creates the file empty if it is missing."""
    kept = []
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)[key] <= last]
    path.write_text("".join(line + "\n" for line in kept))


def window_values(pending: list[dict[str, Any]], images: int, seconds: float) -> dict[str, float]:
    """A log window's line: each metric's mean over the window's steps, and images/s (every training loop)."""
    values = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
    values["images_per_s"] = images / max(seconds, 1e-9)
    return values


class MetricsLog:
    """JSON lines (and TensorBoard events when tensorboardX is installed) of training metrics.

    On resume, lines after the restored step are dropped: they came from steps that the
    checkpoint does not contain and will be run (and logged) again.
    """

    def __init__(self, workdir: Path, start_step: int = 0):
        self.path = workdir / "metrics.jsonl"
        self._file = self._tb = None
        if jax.process_index() != 0:  # a multi-host run: every process computes the same metrics
            return
        truncate_jsonl(self.path, "step", start_step)
        self._file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:
            pass

    def write(self, step: int, values: dict[str, float]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
