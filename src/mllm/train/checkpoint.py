"""Checkpoints: how a training run is saved, found and loaded again.

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
          state.json         step, tokens seen, data position, val/best loss, configs, data identity
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
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mllm.config import ModelConfig
from mllm.errors import MllmError
from mllm.fileio import atomic_write_json, ensure_writable_dir, fsync_dir, read_json
from mllm.model import GPT

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "config.json"
RUN_DATA = "data.json"
RUN_TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer.pt"
STATE = "state.json"
BEST = "best.json"
STEP_PATTERN = re.compile(r"^step_(\d+)$")
REPLACED_PREFIX = ".old-"  # a step_N being replaced by a new save of the same step


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
        match = STEP_PATTERN.match(child.name.removeprefix(REPLACED_PREFIX))
        if match and (child / STATE).is_file() and (child / WEIGHTS).is_file():
            found.setdefault(int(match.group(1)), child)  # step_N first, so it wins
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
    return path if (path / STATE).is_file() and (path / WEIGHTS).is_file() else None


def find_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint eval/generate/serve use: `checkpoint` if given, else the run's best, else
    its latest; one clear MllmError when there is none."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not (path / STATE).is_file() or not (path / WEIGHTS).is_file():
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


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    return read_json(Path(checkpoint) / STATE, f"checkpoint {STATE}")


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """trainer.pt (optimizer, gradient scaler and RNG states): only `mllm train --resume` needs
    it. Loaded with weights_only, so it can hold tensors and plain containers but no code."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise MllmError(
            f"{checkpoint} has no {TRAINER_STATE} (optimizer and RNG state), so it cannot be "
            "resumed; start a new --run-dir (eval/generate/serve can still use its weights)"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def model_config_of(state: dict[str, Any]) -> ModelConfig:
    return ModelConfig.model_validate(state["model_config"])


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    model: GPT,
    state: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoints/step_N atomically (temporary folder, fsync, rename) and return it.

    `model` must be the unwrapped module (not DDP / torch.compile wrappers), so weight names carry
    no `module.` or `_orig_mod.` prefixes.
    """
    parent = ensure_writable_dir(checkpoints_dir(run_dir))
    final = parent / checkpoint_name(step)
    tmp = parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weights = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
        save_file(weights, tmp / WEIGHTS, metadata={"format": "pt"})
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        atomic_write_json(tmp / STATE, state)
        fsync_dir(tmp)
        # Re-saving the same step (e.g. a signal right after an interval save) swaps by renames,
        # so a complete copy exists at every moment (list_checkpoints reads the .old- one if a
        # second signal lands between the two renames).
        replaced = parent / f"{REPLACED_PREFIX}{final.name}"
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)
        tmp.rename(final)
        fsync_dir(parent)
        shutil.rmtree(replaced, ignore_errors=True)  # the old copy, or one a cut-short save left
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


def load_weights(checkpoint: str | Path, model: GPT) -> None:
    """Load model.safetensors into `model` (strict: every name and shape must match)."""
    try:
        weights = load_file(Path(checkpoint) / WEIGHTS)
    except Exception as e:  # safetensors raises its own error type for a truncated/corrupt file
        raise MllmError(
            f"{Path(checkpoint) / WEIGHTS} is damaged ({str(e).splitlines()[0]}): "
            "use another checkpoint (--checkpoint)"
        ) from None
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
    state: dict[str, Any]

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def data(self) -> dict[str, Any]:
        """Identity of the data it trained on (tokenizer_sha256, vocab_size, eot_id, ...)."""
        return self.state["data"]


def load_checkpoint(
    checkpoint: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_factory: Callable[[ModelConfig], GPT] = GPT,
) -> LoadedCheckpoint:
    """Build the model a checkpoint describes, load its weights, move it to device/dtype, eval()."""
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    config = model_config_of(state)
    with torch.device("meta"):
        model = model_factory(config)
    model = model.to_empty(device="cpu")
    load_weights(checkpoint, model)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedCheckpoint(checkpoint, model, state)


def load_run_tokenizer(loaded: LoadedCheckpoint, tokenizer: str | Path | None = None) -> Any:
    """The tokenizer a checkpoint was trained with: `tokenizer` if given, else the copy in its run
    dir; refused with one clear line when its sha256 differs from the one training recorded."""
    from mllm.data.tokenizer import load_tokenizer
    from mllm.fileio import sha256_file

    path = Path(tokenizer) if tokenizer is not None else run_dir_of(loaded.path) / "tokenizer.json"
    if not path.is_file():
        raise MllmError(f"tokenizer not found: {path} (pass --tokenizer PATH)")
    expected = loaded.data.get("tokenizer_sha256")
    actual = sha256_file(path)
    if expected and actual != expected:
        raise MllmError(
            f"tokenizer {path} (sha256 {actual[:12]}…) is not the one this model was trained "
            f"with (sha256 {expected[:12]}…): pass the run's own tokenizer.json"
        )
    return load_tokenizer(path)
