"""What a resumed run needs besides weights and optimizer: where it is in the data, its RNGs, and
the checks that it is the same run.

A run is resumable bit for bit because nothing it draws comes from hidden state:

- The windows it trains on come from `WindowStream`: one seeded numpy Generator (random windows)
  or one cursor (`--stride`, ordered windows), advanced by one *global* batch per optimizer step.
  Every rank draws the same global batch and takes its own slice (`rank_micro_starts`), so the
  data a step sees does not depend on the number of processes.
- Dropout draws from torch's RNG; `capture_rng_state` / `restore_rng_state` save and restore it
  (and the CUDA / MPS generator, and Python's `random`) per rank.

The stream's state is small and JSON-friendly, so it lives in each checkpoint's state.json as the
run's "data position"; the RNG tensors go to trainer.pt beside the optimizer state.

A resume takes the run's saved config with the options given again on top (`merge_resume_config`)
and refuses a different model shape (exit 2) or different data (exit 1).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from mllm.config import ModelConfig, TrainConfig
from mllm.data.datadir import data_json_path
from mllm.data.loader import TokenWindows
from mllm.data.meta import DataMeta
from mllm.errors import MllmError, UsageError
from mllm.train import checkpoint as ckpt


class WindowStream:
    """The sequence of global batches (window starts) a run trains on, with a saveable position."""

    def __init__(
        self, windows: TokenWindows, global_batch: int, seed: int, stride: int | None
    ) -> None:
        self.windows = windows
        self.global_batch = global_batch
        self.stride = stride
        self.rng = np.random.default_rng(seed)
        self.next_window = 0  # ordered windows: index of the next window at `stride`
        self.windows_drawn = 0

    @property
    def order(self) -> str:
        return "random" if self.stride is None else "strided"

    def next_starts(self) -> np.ndarray:
        """Window starts of the next global batch (shape (global_batch,)), advancing the stream."""
        if self.stride is None:
            starts = self.windows.random_starts(self.rng, self.global_batch)
        else:
            starts = self.windows.strided_starts(self.next_window, self.global_batch, self.stride)
            self.next_window = (self.next_window + self.global_batch) % self.windows.num_windows(
                self.stride
            )
        self.windows_drawn += self.global_batch
        return starts

    def state_dict(self) -> ckpt.DataPosition:
        """The stream's position (state.json's data_position)."""
        return ckpt.DataPosition(
            order=self.order,
            stride=self.stride,
            windows_drawn=self.windows_drawn,
            next_window=self.next_window,
            generator=self.rng.bit_generator.state,
        )

    def load_state_dict(self, state: ckpt.DataPosition) -> None:
        """Continue from a saved position; switching between random and ordered windows (or the
        stride) in the middle of a run is refused, since the saved position means nothing then."""
        if state.order != self.order or state.stride != self.stride:
            saved = "random windows" if state.stride is None else f"--stride {state.stride}"
            raise UsageError(
                f"--stride: the checkpoint was trained with {saved}; resume with the same "
                "--stride (or start a new --run-dir)"
            )
        self.rng.bit_generator.state = state.generator
        self.next_window = state.next_window
        self.windows_drawn = state.windows_drawn


def rank_micro_starts(
    global_starts: np.ndarray, grad_accum: int, world_size: int, rank: int
) -> list[np.ndarray]:
    """This rank's window starts for each micro-step of one optimizer step.

    The global batch is laid out as (micro-step, rank, row): at micro-step m, the ranks together
    see exactly the windows one process with a world_size-times larger batch sees at m.
    """
    per_micro = global_starts.reshape(grad_accum, world_size, -1)
    return [per_micro[micro, rank] for micro in range(grad_accum)]


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (torch CPU, the accelerator's, Python's) for trainer.pt."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Undo `capture_rng_state`: later dropout masks are those the uninterrupted run drew."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


# --- Resuming: which checkpoint, with which config, and what may not change ---------------------


def checkpoint_to_resume(run_dir: Path, resume: bool, resume_from: Path | None) -> Path | None:
    """The checkpoint a run continues from (None: a new run), refusing the mistakes: --resume
    where there is nothing to resume, a --resume-from that is not a checkpoint of --run-dir, and
    a new run over an existing one (never overwritten)."""
    if resume_from is not None:
        if not ckpt.is_checkpoint(resume_from):
            raise UsageError(
                f"--resume-from {resume_from} is not a checkpoint folder (it needs "
                f"{ckpt.STATE} and {ckpt.WEIGHTS}): pass one of {ckpt.checkpoints_dir(run_dir)}/"
            )
        found = Path(resume_from)
        if run_dir_of_resolved(found) != Path(run_dir).resolve():
            raise UsageError(
                f"--resume-from {resume_from} is not a checkpoint of --run-dir {run_dir}: pass "
                "the run dir it belongs to"
            )
        return found
    latest = ckpt.latest_checkpoint(run_dir)
    if resume:
        if latest is None:
            raise MllmError(
                f"--resume: no checkpoint in {run_dir} to resume from "
                "(leave out --resume to start a new run there)"
            )
        return latest
    if latest is not None:
        raise MllmError(
            f"{run_dir} already holds a training run (latest checkpoint {latest.name}): continue "
            "it with --resume, or pass a new --run-dir"
        )
    return None


def run_dir_of_resolved(checkpoint: Path) -> Path:
    return ckpt.run_dir_of(checkpoint.resolve())


def merge_resume_config(given: TrainConfig, saved: TrainConfig) -> TrainConfig:
    """The config of a resumed run: the run's saved config, with the options given explicitly
    this time (flags or --config file) on top.

    So `mllm train --resume` alone continues the run as it was, and `--resume --max-steps 20000`
    extends it; giving one of --max-steps / --max-tokens replaces the other.
    """
    explicit = given.model_dump(exclude_unset=True)
    merged = saved.model_dump(exclude={"resume", "resume_from"})
    for key, value in explicit.items():
        if key == "model":
            merged["model"].update(value)
        else:
            merged[key] = value
    if "max_steps" in explicit or "max_tokens" in explicit:
        merged["max_steps"] = explicit.get("max_steps")
        merged["max_tokens"] = explicit.get("max_tokens")
    if explicit.get("optimizer", saved.optimizer) != saved.optimizer:
        raise UsageError(
            f"--optimizer {explicit['optimizer']}: the run was trained with --optimizer "
            f"{saved.optimizer} and its checkpoint holds that optimizer's state; resume without "
            "--optimizer, or start a new --run-dir"
        )
    merged["run_dir"] = str(given.run_dir)
    merged["resume"] = True
    merged["resume_from"] = given.resume_from
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as e:
        problem = e.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        raise UsageError(
            f"--resume: the run's saved config with these options is invalid: "
            f"{where + ': ' if where else ''}{message}"
        ) from None


def check_same_model(model_config: ModelConfig, state: ckpt.RunState, checkpoint: Path) -> None:
    """Refuse (exit 2) a resume whose model shape differs from the checkpoint's; dropout may change.

    --context is the size of the position table, so a longer --context than the checkpoint's is
    named as such.
    """
    saved = state.model
    if model_config.context > saved.context:
        raise UsageError(
            f"--context {model_config.context} is longer than the position table of {checkpoint} "
            f"({saved.context} positions): resume with --context {saved.context}, or start a new "
            "--run-dir"
        )
    for name in ModelConfig.model_fields:
        if name == "dropout":
            continue
        new, old = getattr(model_config, name), getattr(saved, name)
        if new != old:
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag} {new} differs from the checkpoint's {old} ({checkpoint}): a resumed run "
                f"keeps its model shape; drop {flag}, or start a new --run-dir"
            )


def check_same_data(meta: DataMeta, data_dir: Path, state: ckpt.RunState, checkpoint: Path) -> None:
    """Refuse (exit 1) resuming onto different packed data: the data position would be
    meaningless and the tokenizer may differ."""
    saved = state.data.pack_id
    if saved != meta.pack_id:
        raise MllmError(
            f"{data_json_path(data_dir)} is pack {meta.pack_id!s:.16} but {checkpoint} trained on "
            f"pack {saved!s:.16}: resume with the --data-dir it trained on, or start a new "
            "--run-dir"
        )
