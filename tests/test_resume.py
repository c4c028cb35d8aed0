"""Exact resume: a run killed mid-way (SIGKILL, SIGTERM, SIGINT) and continued with --resume logs
bit for bit the losses of a run that was never interrupted; mismatched resumes are refused; a
diverged run stops without saving over its last good checkpoint."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mllm.train.loop
from fixtures import (
    CLI_ENV,
    config_for,
    config_from_flags,
    read_metrics,
    start_training,
    tiny_flags,
    train_losses,
    val_losses,
    wait_for_step,
    write_data_dir,
)
from mllm.config import TrainConfig
from mllm.errors import MllmError, UsageError
from mllm.train import checkpoint as ckpt
from mllm.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training on one thread


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_data_dir(tmp_path / "data")
    return tmp_path / "data"


def resume_config(run_dir: Path, *flags: str | Path) -> TrainConfig:
    """What `mllm train --run-dir RUN_DIR --resume FLAGS...` resolves to."""
    return config_from_flags(["--run-dir", run_dir, "--resume", *flags])


def test_sigkill_then_resume_logs_bitwise_the_same_losses(data_dir: Path, tmp_path: Path) -> None:
    """Random windows and dropout: the numpy window stream and torch's RNG are both restored.
    The reference and the resume run in this process; the run that is killed in a subprocess."""
    # Long enough that the kill lands mid-run even when this machine is busy.
    common = {"max_steps": 200, "ckpt_interval": 7, "eval_interval": 40, "dropout": 0.1}
    reference = tmp_path / "reference"
    train(config_for(data_dir, reference, **common))

    killed = tmp_path / "killed"
    process = start_training(tiny_flags(data_dir, killed, **common), tmp_path)
    wait_for_step(process, killed, 15)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    stopped_at = ckpt.read_state(ckpt.latest_checkpoint(killed)).step
    assert stopped_at < 200, "the kill came after the run finished: nothing was tested"

    result = train(resume_config(killed))  # `mllm train --run-dir killed --resume`
    assert result.step == 200 and result.exit_code == 0
    assert train_losses(killed) == train_losses(reference)  # every step, bit for bit
    assert val_losses(killed) == val_losses(reference)
    assert (killed / "loss.png").is_file()
    assert [p.name for p in ckpt.list_checkpoints(killed)][-1] == "step_000200"


def test_sigterm_saves_then_resume_matches_with_ordered_windows_and_accumulation(
    data_dir: Path, tmp_path: Path
) -> None:
    """--stride (ordered windows) and --grad-accum 2; SIGTERM stops at a step boundary with a
    checkpoint of exactly that step, a message, and exit code 143."""
    common = {"max_steps": 160, "stride": 16, "grad_accum": 2, "batch_size": 4}
    reference = tmp_path / "reference"
    train(config_for(data_dir, reference, **common))

    stopped = tmp_path / "stopped"
    process = start_training(tiny_flags(data_dir, stopped, ckpt_interval=1000, **common), tmp_path)
    wait_for_step(process, stopped, 12)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    state = ckpt.read_state(ckpt.latest_checkpoint(stopped))
    assert state.step == train_losses(stopped)[-1][0] < 160
    assert state.data_position.order == "strided"

    train(resume_config(stopped))
    assert train_losses(stopped) == train_losses(reference)
    assert val_losses(stopped) == val_losses(reference)


def test_sigint_saves_at_once_and_exits_130(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Ctrl-C after step 3 (sent to this process from inside the step): the step finishes, a
    checkpoint of step 3 is saved, the handlers are put back."""
    real_step = mllm.train.loop.train_step
    calls = []

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(mllm.train.loop, "train_step", step_then_interrupt)
    handler_before = signal.getsignal(signal.SIGINT)
    result = train(config_for(data_dir, tmp_path / "run", max_steps=1000))
    assert result.exit_code == 130 and result.step == 3 and len(calls) == 3
    assert ckpt.read_state(result.checkpoint).step == 3
    assert result.checkpoint == ckpt.latest_checkpoint(tmp_path / "run")
    assert "stopped by SIGINT at step 3" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_a_signal_during_the_last_step_ends_as_a_finished_run(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real_step = mllm.train.loop.train_step

    def step_then_interrupt(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(mllm.train.loop, "train_step", step_then_interrupt)
    result = train(config_for(data_dir, tmp_path / "run", max_steps=1))
    assert result.exit_code == 0 and result.step == 1  # nothing left for --resume to do
    assert ckpt.read_state(result.checkpoint).step == 1
    assert "stopped by" not in capsys.readouterr().err


@pytest.fixture
def short_run(data_dir: Path, tmp_path: Path) -> Path:
    """A finished 4-step run (checkpoints at 2 and 4), trained in-process."""
    run_dir = tmp_path / "short"
    train(config_for(data_dir, run_dir, max_steps=4, ckpt_interval=2, eval_interval=2))
    return run_dir


def test_resume_refuses_a_changed_model_shape(run_cli, data_dir: Path, short_run: Path) -> None:
    for flags, message in [
        (["--d-model", "64"], "--d-model 64 differs from the checkpoint's 32"),
        (["--layers", "3"], "--layers 3 differs from the checkpoint's 2"),
        (["--context", "64"], "--context 64 is longer than the position table"),
        (["--context", "16"], "--context 16 differs from the checkpoint's 32"),
    ]:
        with pytest.raises(UsageError, match=message):
            train(resume_config(short_run, *flags))
    flags = ["--run-dir", short_run, "--resume", "--context", "64", "--max-steps", "8"]
    result = run_cli("train", *flags, env=CLI_ENV)
    assert result.returncode == 2
    assert "position table" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert ckpt.read_state(ckpt.latest_checkpoint(short_run)).step == 4  # nothing was written


def test_resume_refuses_other_data(data_dir: Path, short_run: Path, tmp_path: Path) -> None:
    write_data_dir(tmp_path / "other", pack_id="pack-b")
    config = config_for(tmp_path / "other", short_run, resume=True, max_steps=8)
    with pytest.raises(MllmError, match=r"is pack pack-b but .* trained on pack pack-a") as info:
        train(config)
    assert info.value.exit_code == 1


def test_new_run_over_an_existing_one_and_resume_from_nothing_are_refused(
    data_dir: Path, short_run: Path, tmp_path: Path
) -> None:
    with pytest.raises(MllmError, match=r"already holds a training run .* --resume"):
        train(config_for(data_dir, short_run))
    with pytest.raises(MllmError, match=r"no checkpoint in .* to resume from"):
        train(config_for(data_dir, tmp_path / "empty", resume=True))


def test_resume_alone_continues_with_the_saved_config(data_dir: Path, short_run: Path) -> None:
    """`--resume --max-steps 6` needs no other flag: the model shape comes from the run."""
    result = train(resume_config(short_run, "--max-steps", "6"))
    assert result.step == 6
    assert [s for s, _ in train_losses(short_run)] == [1, 2, 3, 4, 5, 6]
    already = train(resume_config(short_run, "--max-steps", "6"))
    assert already.step == 6  # nothing to do: says so and leaves the run as it is


def test_diverged_run_stops_without_saving(short_run: Path) -> None:
    """An absurd learning rate turns the loss to NaN/inf: exit 1, one line naming the step, and
    the last good checkpoint is still the latest, with finite weights."""
    with pytest.raises(MllmError) as info:
        train(resume_config(short_run, "--lr", "1e30", "--max-steps", "12"))
    message = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in message
    assert message.startswith("training diverged") and "step_000004" in message
    latest = ckpt.latest_checkpoint(short_run)
    assert latest.name == "step_000004"
    weights = load_file(latest / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(math.isfinite(r.get("loss", 0.0)) for r in read_metrics(short_run))
