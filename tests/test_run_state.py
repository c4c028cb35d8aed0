"""state.json as a typed RunState: written by train, read by every command; a checkpoint of the
previous release (tests/assets/legacy-0.1.0) still loads and resumes; a damaged file of a
checkpoint is one line naming it and the way out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fixtures import one_error_line
from mllm.train import checkpoint as ckpt
from mllm.train.resume import WindowStream

LEGACY = Path(__file__).parent / "assets" / "legacy-0.1.0"
LEGACY_STEP = LEGACY / "run" / "checkpoints" / "step_000006"
# Steps 7-9 logged by mllm 0.1.0 resuming this very checkpoint (`mllm train --data-dir data
# --run-dir run --resume --max-steps 9 --log-interval 1`, 2-core AMD EPYC, bf16).
LEGACY_RESUMED_LOSSES = [5.698151588439941, 5.684746742248535, 5.709224224090576]


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """A copy of the 0.1.0 data dir (data/) and run dir (run/), to resume and damage."""
    shutil.copytree(LEGACY, tmp_path / "legacy")
    return tmp_path / "legacy"


def test_a_state_json_of_0_1_0_loads_with_the_model_config_stored_once() -> None:
    raw = json.loads((LEGACY_STEP / ckpt.STATE).read_text())
    assert "model_config" in raw  # 0.1.0 stored it twice
    state = ckpt.read_state(LEGACY_STEP)
    assert state.step == 6 and state.tokens_seen == 384
    assert state.model.vocab_size == 300 and state.model == state.train_config.model
    assert state.data.pack_id == raw["data"]["pack_id"]
    assert state.data_position.windows_drawn == 24
    assert "model_config" not in state.model_dump()


def test_legacy_checkpoint_loads_for_inference() -> None:
    loaded = ckpt.load_checkpoint(LEGACY_STEP)
    assert loaded.config.d_model == 16 and loaded.data.eot_id == 0


def test_run_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    loaded = ckpt.load_checkpoint(LEGACY_STEP)
    state = loaded.state.model_copy(update={"step": 7, "val_loss": None})
    path = ckpt.write_checkpoint(tmp_path / "run", loaded.model, state)
    assert path.name == "step_000007"
    assert ckpt.read_state(path) == state


def test_window_stream_position_is_the_state_jsons(tmp_path: Path) -> None:
    from mllm.data.loader import TokenWindows

    windows = TokenWindows(LEGACY / "data" / "train.bin", "uint16", 16)
    stream = WindowStream(windows, 4, seed=1337, stride=None)
    for _ in range(6):
        stream.next_starts()
    saved = ckpt.read_state(LEGACY_STEP).data_position
    assert stream.state_dict() == saved  # the legacy run drew 6 global batches of 4 from seed 1337


def test_the_legacy_run_resumes_where_it_left_off(legacy: Path, run_cli) -> None:
    result = run_cli(
        "train", "--data-dir", "data", "--run-dir", "run", "--resume", "--max-steps", "9",
        "--log-interval", "1", "-q", cwd=legacy,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (legacy / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if "loss" in r and r["step"] > 6]
    assert losses == pytest.approx(LEGACY_RESUMED_LOSSES, rel=1e-2)
    assert ckpt.read_state(legacy / "run" / "checkpoints" / "step_000009").step == 9


def test_a_damaged_trainer_pt_names_the_file_and_resume_from(legacy: Path, run_cli) -> None:
    resume = ["train", "--data-dir", "data", "--run-dir", "run", "-q", "--max-steps"]
    assert run_cli(*resume, "9", "--resume", cwd=legacy).returncode == 0  # saves step 9 too
    damaged = legacy / "run" / "checkpoints" / "step_000009" / ckpt.TRAINER_STATE
    damaged.write_bytes(damaged.read_bytes()[:1000])
    result = run_cli(*resume, "12", "--resume", cwd=legacy)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "run/checkpoints/step_000009/trainer.pt is damaged" in line
    assert "--resume-from run/checkpoints/step_000006" in line
    assert "PytorchStreamReader" in line and "unexpected" not in line
    again = run_cli(*resume, "12", "--resume-from", "run/checkpoints/step_000006", cwd=legacy)
    assert again.returncode == 0, again.stderr
    assert ckpt.read_state(legacy / "run" / "checkpoints" / "step_000012").step == 12
    ckpt.read_trainer_state(damaged.parent)  # the later, damaged step 9 was removed and saved anew


def test_damaged_weights_or_state_name_the_file_in_every_command(legacy: Path, run_cli) -> None:
    step = legacy / "run" / "checkpoints" / "step_000006"
    weights = step / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    for command in (
        ["eval", "--data-dir", "data", "--run-dir", "run"],
        ["generate", "Once", "--run-dir", "run"],
        ["serve", "--run-dir", "run", "--port", "0"],
        ["train", "--data-dir", "data", "--run-dir", "run", "--resume"],
    ):
        result = run_cli(*command, cwd=legacy)
        assert result.returncode == 1, (command, result.stderr)
        assert "run/checkpoints/step_000006/model.safetensors is damaged" in one_error_line(result)
    (step / ckpt.STATE).write_text('{"step": 6')
    result = run_cli("generate", "Once", "--run-dir", "run", "--checkpoint", str(step), cwd=legacy)
    assert "state.json is damaged (not valid JSON)" in one_error_line(result)
    (step / ckpt.STATE).write_text('{"step": 6}')
    result = run_cli("eval", "--data-dir", "data", "--run-dir", "run", cwd=legacy)
    assert "state.json is damaged (tokens_seen: Field required)" in one_error_line(result)


def test_resume_from_must_be_a_checkpoint_of_the_run_dir(legacy: Path, run_cli) -> None:
    shutil.copytree(legacy / "run", legacy / "other")
    result = run_cli(
        "train", "--data-dir", "data", "--run-dir", "run",
        "--resume-from", "other/checkpoints/step_000006", cwd=legacy,
    )  # fmt: skip
    assert result.returncode == 2
    assert "is not a checkpoint of --run-dir run" in one_error_line(result)
    result = run_cli(
        "train", "--data-dir", "data", "--run-dir", "run", "--resume-from", "nothere", cwd=legacy
    )
    assert result.returncode == 2
    assert "--resume-from nothere is not a checkpoint folder" in one_error_line(result)


def test_trainer_pt_without_optimizer_state_is_damaged(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints" / "step_000001"
    folder.mkdir(parents=True)
    torch.save({"rng": []}, folder / ckpt.TRAINER_STATE)
    with pytest.raises(ckpt.DamagedCheckpoint, match="lacks the optimizer"):
        ckpt.read_trainer_state(folder)
