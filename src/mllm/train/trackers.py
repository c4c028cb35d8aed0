"""Experiment trackers (`mllm train --tracker tensorboard --tracker wandb`): the numbers of every
metrics.jsonl record, under the same names with the step as the x axis, and the resolved config
(config.json's), mirrored to TensorBoard and / or Weights & Biases. metrics.jsonl stays the record
of a run; a tracker is a view of it.

- TensorBoard: event files in RUN_DIR/tensorboard/ (`torch.utils.tensorboard.SummaryWriter`), the
  config as a text summary (`config`, a JSON block) and as hparams. A resumed run writes a new
  event file into the same folder whose first event purges the events after the resume step
  (those of the run that was stopped), as metrics.jsonl drops their records.
- wandb: `wandb.init(config=...)`, which honours wandb's own environment (WANDB_MODE=offline,
  WANDB_DIR, WANDB_PROJECT, ...); by default its files go under the run dir, the project is
  "mllm" and the run is named after the run dir. The run id is kept in RUN_DIR/wandb-run-id, and a
  resumed run continues that wandb run (`id=..., resume="allow"`).

Only rank 0 has trackers. A tracker that cannot start, or that fails while the run goes on, is one
warning and the run goes on without it: a tracker never costs a training run.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from mllm.config import TrainConfig
from mllm.console import is_quiet, warn
from mllm.fileio import atomic_write_text

TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID = "wandb-run-id"

# wandb.init's arguments that mllm fills in, and the environment variable that overrides each.
WANDB_ENV = {
    "dir": "WANDB_DIR",
    "project": "WANDB_PROJECT",
    "name": "WANDB_NAME",
    "id": "WANDB_RUN_ID",
    "resume": "WANDB_RESUME",
}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record by their metrics.jsonl names (not the step, which is
    the x axis, nor the flag `cold`)."""
    return {
        key: value
        for key, value in record.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class Tracker(Protocol):
    name: str

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # Events at steps >= purge_step, left by the run that was stopped, are dropped on reading.
        purge_step = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge_step)
        step = resume_step or 0
        text = json.dumps(config, indent=2)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), step)
        for summary in hparams(flat_hparams(config), {"loss": None, "val_loss": None}):
            self.writer.file_writer.add_summary(summary, step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as TensorBoard hparams: nested keys joined with dots, values that are not
    numbers, strings or booleans as their JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            ok = isinstance(value, int | float | str | bool)
            flat[prefix + key] = value if ok else json.dumps(value)
    return flat


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        import wandb

        id_file = run_dir / WANDB_RUN_ID
        run_id = None
        if resume_step is not None and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip() or None
        if is_quiet():  # --quiet silences wandb's banner and summary too (WANDB_SILENT wins)
            os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(config=config, **wandb_options(run_dir, run_id, os.environ))
        try:
            if not self.run.disabled:
                atomic_write_text(id_file, self.run.id + "\n")
        except BaseException:
            self.run.finish(exit_code=1)
            raise

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_options(run_dir: Path, run_id: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """wandb.init's arguments: files under the run dir, project "mllm", the run named after the
    run dir, the saved run id (a resume) continued, each unless wandb's environment says."""
    options = {
        "dir": str(run_dir),
        "project": "mllm",
        "name": run_dir.name,
        "id": run_id,
        "resume": "allow",
    }
    return {k: v for k, v in options.items() if v is not None and WANDB_ENV[k] not in environ}


STARTERS: dict[str, type[TensorBoardTracker] | type[WandbTracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
}


class Trackers:
    """The trackers of a run: each record goes to every one; one that fails is dropped."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    @property
    def names(self) -> list[str]:
        return [tracker.name for tracker in self.trackers]

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        for tracker in list(self.trackers):
            try:
                tracker.log(record["step"], values)
            except Exception as e:
                self.trackers.remove(tracker)
                warn(
                    f"--tracker {tracker.name} failed at step {record['step']} ({one_line(e)}): "
                    "training goes on without it (metrics.jsonl has every record)"
                )
                with contextlib.suppress(Exception):  # already warned about it
                    tracker.close()

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close()
            except Exception as e:
                warn(f"--tracker {tracker.name} did not close cleanly ({one_line(e)})")


def start_trackers(config: TrainConfig, resume_step: int | None) -> Trackers:
    """Start the --tracker ones for the run in config.run_dir (`resume_step`: the step a resumed
    run continues from; None for a new run); one that cannot start is a warning."""
    saved = config.model_dump(mode="json", exclude={"resume", "resume_from"})  # config.json's
    started: list[Tracker] = []
    for name in dict.fromkeys(config.tracker):
        try:
            started.append(STARTERS[name](config.run_dir, saved, resume_step))
        except ImportError as e:
            warn(
                f"--tracker {name} not started: cannot import it ({one_line(e)}); install it with "
                f"pip install 'mllm[{name}]'; training goes on without it"
            )
        except Exception as e:
            warn(f"--tracker {name} not started ({one_line(e)}); training goes on without it")
    return Trackers(started)
