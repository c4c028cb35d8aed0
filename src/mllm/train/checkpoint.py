"""The run dir: how a training run is saved, found and loaded again. This module owns its layout
and its files (the typed run state `RunState` is state.json).

Layout of a run dir:

    runs/<name>/
      config.json          the resolved TrainConfig
      data.json            copy of the data.json the run trained on
      tokenizer.json       copy of the tokenizer, so the run dir alone can generate and serve
      metrics.jsonl, loss.png
      checkpoints/
        step_000100/
          model.safetensors  weights of the unwrapped model (no pickle in what users share)
          trainer.pt         optimizer, scaler and RNG states (only needed to resume)
          state.json         RunState: step, tokens, data position, losses, config, data identity
        best.json          {"checkpoint": "step_000100", "val_loss": ...}: the best by val loss

A checkpoint folder is written under a temporary name and renamed into place, so a folder named
step_N is always complete; best.json is written atomically after the folder exists. Retention keeps
the last K folders and the one best.json names.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file

from mllm import __version__
from mllm.config import ModelConfig, TrainConfig
from mllm.console import warn
from mllm.data.datadir import DATA_JSON, TOKENIZER, data_json_path, tokenizer_path
from mllm.data.meta import DataMeta
from mllm.errors import MllmError, first_line
from mllm.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    ensure_writable_dir,
    fsync_dir,
    read_json,
    sha256_file,
    swap_in_folder,
)
from mllm.model import GPT
from mllm.train.budget import TimePlan
from mllm.train.sharding import full_weights

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "config.json"
RUN_DATA = DATA_JSON  # copies of the data dir's, under the same names
RUN_TOKENIZER = TOKENIZER
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer.pt"
STATE = "state.json"
BEST = "best.json"
STEP_PATTERN = re.compile(r"^step_(\d+)$")
REPLACED_PREFIX = ".old-"  # a step_N being replaced by a new save of the same step


# --- state.json: the typed run state ------------------------------------------------------------


class DataPosition(BaseModel):
    """Where the run is in its stream of training windows (resume.WindowStream's state)."""

    model_config = ConfigDict(extra="forbid")

    order: Literal["random", "strided"]
    stride: int | None = None
    windows_drawn: int = Field(ge=0)
    next_window: int = Field(0, ge=0, description="Ordered windows: the next one's index.")
    generator: dict[str, Any] = Field(description="numpy PCG64 state (random windows).")


class DataIdentity(BaseModel):
    """What a checkpoint records of the data it trained on: eval, generate and serve check the
    tokenizer against it, resume checks the pack."""

    model_config = ConfigDict(extra="forbid")

    pack_id: str
    tokenizer_sha256: str
    vocab_size: int = Field(ge=1)
    eot_id: int | None = None
    dtype: Literal["uint16", "uint32"]

    @classmethod
    def of(cls, meta: DataMeta) -> DataIdentity:
        return cls(
            pack_id=meta.pack_id,
            tokenizer_sha256=meta.tokenizer_sha256,
            vocab_size=meta.vocab_size,
            eot_id=meta.eot_id,
            dtype=meta.dtype,
        )


class RunState(BaseModel):
    """state.json: everything about a checkpoint but its tensors.

    The model's shape is `train_config.model` (stored once); a state.json written by mllm 0.1.0,
    which also stored it beside the train config as `model_config`, still loads.
    """

    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0, description="Optimizer steps done.")
    tokens_seen: int = Field(ge=0)
    total_steps: int = Field(ge=0, description="Steps the run plans in all (the schedule's end).")
    elapsed: float = Field(0.0, ge=0, description="Wall seconds of the run so far.")
    val_loss: float | None = Field(None, description="Validation loss at this step, if measured.")
    best_val_loss: float | None = None
    world_size: int = Field(1, ge=1, description="Processes that trained it.")
    dtype: Literal["bf16", "fp16", "fp32"] = Field(description="Training precision.")
    data_position: DataPosition
    train_config: TrainConfig = Field(description="The resolved config (model shape included).")
    data: DataIdentity
    time_plan: TimePlan | None = Field(None, description="--time-budget's plan, once made.")
    mllm_version: str = __version__
    torch_version: str = Field(default_factory=lambda: torch.__version__)

    @model_validator(mode="before")
    @classmethod
    def _model_config_stored_once(cls, data: Any) -> Any:
        """mllm 0.1.0 stored the model config twice: the train config's copy is the same one."""
        if isinstance(data, dict) and "model_config" in data:
            data = dict(data)
            model = data.pop("model_config")
            if isinstance(data.get("train_config"), dict):
                data["train_config"] = {**data["train_config"], "model": model}
        return data

    @model_validator(mode="before")
    @classmethod
    def _trained_before_muon(cls, data: Any) -> Any:
        """A run saved before --optimizer existed (mllm 0.1.0) trained with AdamW, a cosine and
        GPT-2's init: resuming it keeps those, not today's defaults."""
        if isinstance(data, dict) and isinstance(data.get("train_config"), dict):
            saved = data["train_config"]
            if "optimizer" not in saved:
                legacy = {"optimizer": "adamw", "schedule": "cosine", "zero_init_residual": False}
                data = {**data, "train_config": {**legacy, **saved}}
        return data

    @property
    def model(self) -> ModelConfig:
        """The model's shape (vocab size resolved)."""
        return self.train_config.model


class DamagedCheckpoint(MllmError):
    """A file of a checkpoint cannot be read. The message names the file and the way out; eval,
    generate and serve take another --checkpoint, train a --resume-from (see `way_out`)."""

    def __init__(self, file: Path, reason: str) -> None:
        self.file = file
        self.reason = reason
        super().__init__(self.describe(resuming=False))

    @property
    def checkpoint(self) -> Path:
        return self.file.parent

    def describe(self, resuming: bool) -> str:
        previous = previous_checkpoint(self.checkpoint)
        if resuming:
            way_out = (
                f"resume from the previous complete checkpoint with `--resume-from {previous}`"
                if previous is not None
                else "no earlier checkpoint is left to resume from: start a new --run-dir"
            )
        else:
            way_out = (
                f"use another checkpoint, e.g. --checkpoint {previous}"
                if previous
                else ("use another checkpoint (--checkpoint)")
            )
        return f"{self.file} is damaged ({self.reason}): {way_out}"


def previous_checkpoint(checkpoint: Path) -> Path | None:
    """The complete checkpoint of the same run saved before `checkpoint` (None: none)."""
    step = step_of(checkpoint)
    if step is None:
        return None
    earlier = [path for path in list_checkpoints(run_dir_of(checkpoint)) if step_of(path) < step]
    return earlier[-1] if earlier else None


def step_of(checkpoint: Path) -> int | None:
    """N of a step_N folder (or of the .old-step_N standing in for it); None for other names."""
    match = STEP_PATTERN.match(checkpoint.name.removeprefix(REPLACED_PREFIX))
    return int(match.group(1)) if match else None


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are ignored; a
    `.old-step_N` left by a re-save cut short stands in for a missing step_N)."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found: dict[int, Path] = {}
    for child in sorted(folder.iterdir(), key=lambda path: path.name.startswith(REPLACED_PREFIX)):
        step = step_of(child)
        if step is not None and is_checkpoint(child):
            found.setdefault(step, child)  # step_N first, so it wins
    return [found[step] for step in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint best.json names, if it names one that exists."""
    pointer = checkpoints_dir(run_dir) / BEST
    if not pointer.is_file():
        return None
    name = read_json(pointer, BEST).get("checkpoint")
    path = checkpoints_dir(run_dir) / str(name)
    return path if is_checkpoint(path) else None


def is_checkpoint(folder: str | Path) -> bool:
    """Whether `folder` is a complete checkpoint folder (its state.json and weights exist)."""
    return (Path(folder) / STATE).is_file() and (Path(folder) / WEIGHTS).is_file()


def find_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint eval/generate/serve use: `checkpoint` if given, else the run's best, else
    its latest; one clear MllmError when there is none."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not is_checkpoint(path):
            raise MllmError(f"{path} is not a checkpoint folder (it needs {STATE} and {WEIGHTS})")
        return path
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MllmError(
            f"run dir {run_dir} does not exist: train first (`mllm train`) or pass --run-dir"
        )
    found = best_checkpoint(run_dir) or latest_checkpoint(run_dir)
    if found is None:
        raise MllmError(
            f"no checkpoint in {run_dir}: train first (`mllm train --run-dir {run_dir}`)"
        )
    return found


def run_dir_of(checkpoint: Path) -> Path:
    """The run dir a checkpoint folder belongs to (runs/x/checkpoints/step_N -> runs/x)."""
    return checkpoint.parent.parent


def read_state(checkpoint: str | Path) -> RunState:
    """The checkpoint's state.json, validated; a damaged one is one line naming it."""
    path = Path(checkpoint) / STATE
    try:
        data = read_json(path, f"checkpoint {STATE}")
    except MllmError as e:
        if not path.is_file():
            raise
        raise DamagedCheckpoint(path, "not valid JSON") from e
    try:
        return RunState.model_validate(data)
    except ValidationError as e:
        problem = e.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise DamagedCheckpoint(path, f"{where}: {problem['msg']}") from None


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """trainer.pt (optimizer, gradient scaler and RNG states): only `mllm train --resume` needs
    it. Loaded with weights_only, so it can hold tensors and plain containers but no code."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise MllmError(
            f"{checkpoint} has no {TRAINER_STATE} (optimizer and RNG state), so it cannot be "
            "resumed; start a new --run-dir (eval/generate/serve can still use its weights)"
        )
    try:
        trainer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle weights_only refuses, ...
        raise DamagedCheckpoint(path, first_line(e)) from None
    if not isinstance(trainer, dict) or not {"optimizer", "rng"} <= trainer.keys():
        raise DamagedCheckpoint(path, "it lacks the optimizer or RNG state")
    return trainer


def write_checkpoint(
    run_dir: str | Path,
    model: GPT | dict[str, torch.Tensor],
    state: RunState,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoints/step_N atomically (temporary folder, fsync, rename) and return it.

    `model` must be the unwrapped module (not DDP / torch.compile wrappers), so weight names carry
    no `module.` or `_orig_mod.` prefixes; or its whole weights already on the CPU (a sharded
    model's, which every rank gathers with `sharding.full_weights` before rank 0 writes).
    """
    parent = ensure_writable_dir(checkpoints_dir(run_dir))
    final = parent / checkpoint_name(state.step)
    tmp = parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weights = full_weights(model) if isinstance(model, torch.nn.Module) else model
        save_file(weights, tmp / WEIGHTS, metadata={"format": "pt"})
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        atomic_write_json(tmp / STATE, state.model_dump(mode="json"))
        fsync_dir(tmp)
        # Re-saving the same step (e.g. a signal right after an interval save) swaps by renames,
        # so a complete copy exists at every moment (list_checkpoints reads the .old- one if a
        # second signal lands between the two renames).
        swap_in_folder(tmp, final, parent / f"{REPLACED_PREFIX}{final.name}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def mark_best(run_dir: str | Path, checkpoint: Path, val_loss: float) -> None:
    """Point best.json at `checkpoint` (atomically)."""
    atomic_write_json(
        checkpoints_dir(run_dir) / BEST, {"checkpoint": checkpoint.name, "val_loss": val_loss}
    )


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the last `keep_last` checkpoints and the best one; return what was deleted."""
    checkpoints = list_checkpoints(run_dir)
    best = best_checkpoint(run_dir)
    doomed = [path for path in checkpoints[:-keep_last] if path != best]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_checkpoints_after(run_dir: str | Path, step: int) -> list[Path]:
    """Delete the checkpoints saved after `step` (a run resumed from an earlier checkpoint saves
    those steps again: left in place, they would pass for its latest); return what was deleted."""
    doomed = [path for path in list_checkpoints(run_dir) if (step_of(path) or 0) > step]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def load_weights(checkpoint: str | Path, model: GPT) -> None:
    """Load model.safetensors into `model` (strict: every name and shape must match)."""
    try:
        weights = load_file(Path(checkpoint) / WEIGHTS)
    except Exception as e:  # safetensors raises its own error type for a truncated/corrupt file
        raise DamagedCheckpoint(Path(checkpoint) / WEIGHTS, first_line(e)) from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise MllmError(
            f"{checkpoint} does not match the model: {str(e).splitlines()[-1]}"
        ) from None
    if missing or unexpected:
        raise MllmError(
            f"{checkpoint} does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )


@dataclass
class LoadedCheckpoint:
    """A model ready for inference, with what it was trained on."""

    path: Path
    model: GPT
    state: RunState

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def data(self) -> DataIdentity:
        """Identity of the data it trained on (tokenizer_sha256, vocab_size, eot_id, ...)."""
        return self.state.data


def load_checkpoint(
    checkpoint: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_factory: Callable[[ModelConfig], GPT] = GPT,
) -> LoadedCheckpoint:
    """Build the model a checkpoint describes, load its weights, move it to device/dtype, eval()."""
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    with torch.device("meta"):
        model = model_factory(state.model)
    model = model.to_empty(device="cpu")
    load_weights(checkpoint, model)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedCheckpoint(checkpoint, model, state)


def load_run_tokenizer(loaded: LoadedCheckpoint, tokenizer: str | Path | None = None) -> Any:
    """The tokenizer a checkpoint was trained with: `tokenizer` if given, else the copy in its run
    dir; refused with one clear line when its sha256 differs from the one training recorded."""
    from mllm.data.tokenizer import load_tokenizer

    path = Path(tokenizer) if tokenizer is not None else run_dir_of(loaded.path) / RUN_TOKENIZER
    if not path.is_file():
        raise MllmError(f"tokenizer not found: {path} (pass --tokenizer PATH)")
    expected = loaded.data.tokenizer_sha256
    actual = sha256_file(path)
    if expected and actual != expected:
        raise MllmError(
            f"tokenizer {path} (sha256 {actual[:12]}…) is not the one this model was trained "
            f"with (sha256 {expected[:12]}…): pass the run's own tokenizer.json"
        )
    return load_tokenizer(path)


# --- The run dir's other files ----------------------------------------------------------------


def tokenizer_packed_the_bins(data_dir: Path, meta: DataMeta) -> bool | None:
    """Whether DATA_DIR/tokenizer.json is the one the bins were packed with (None: there is
    none). A new run refuses False (`mllm tokenize` re-run after `mllm pack`): it could never be
    sampled, since the tokenizer its ids mean is gone."""
    tokenizer = tokenizer_path(data_dir)
    if not tokenizer.is_file():
        return None
    return sha256_file(tokenizer) == meta.tokenizer_sha256


def write_run_files(config: TrainConfig, tokenizer_matches: bool | None) -> None:
    """config.json (the resolved config), and copies of data.json and tokenizer.json (when it is
    the one the bins were packed with), so the run dir alone is enough for eval, generate and
    serve."""
    run_dir = config.run_dir
    # Without the resume options, so the file can start a new run as --config (flags win).
    saved = config.model_dump(mode="json", exclude={"resume", "resume_from"})
    atomic_write_json(run_dir / RUN_CONFIG, saved)
    atomic_write_bytes(run_dir / RUN_DATA, data_json_path(config.data_dir).read_bytes())
    tokenizer = tokenizer_path(config.data_dir)
    if tokenizer_matches is None:
        warn(f"no {tokenizer}: generate and serve will need --tokenizer")
    elif not tokenizer_matches:  # only on --resume: a new run refuses it
        warn(f"{tokenizer} changed since the bins were packed: the run dir's copy is kept")
    else:
        atomic_write_bytes(run_dir / RUN_TOKENIZER, tokenizer.read_bytes())


def trainer_state(
    optimizer: dict[str, Any], scaler: torch.amp.GradScaler, rng: list[dict[str, Any]]
) -> dict[str, Any]:
    """trainer.pt's payload: what only a resume needs (optimizer: its whole state dict, gathered
    when sharded; rng: every rank's RNG states)."""
    return {"optimizer": optimizer, "scaler": scaler.state_dict(), "rng": rng}
