"""Many processes: `torchrun --nproc-per-node 2` (gloo on CPU) with batch B logs the losses one
process with batch 2B logs, rank 0 alone writes, and a distributed run resumes exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import (
    CLI_ENV,
    config_for,
    tiny_flags,
    train_losses,
    val_losses,
    write_data_dir,
)
from mllm.train import checkpoint as ckpt
from mllm.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training on one thread

COMMON = {"max_steps": 8, "grad_accum": 2, "eval_interval": 4, "ckpt_interval": 4}


def torchrun(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 -m mllm train ...`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "mllm", "train", *map(str, args)]
    env = {**os.environ, **CLI_ENV, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# Muon orthogonalises in bf16, which turns the all-reduce's different summation order (a few
# ulps of fp32 in the gradients) into differences of about 1e-5 in the losses; AdamW's stay
# below 1e-6.
TOLERANCE = {"adamw": 1e-6, "muon": 1e-4}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_two_processes_match_one_and_resume_exactly(tmp_path: Path, optimizer: str) -> None:
    data_dir = tmp_path / "data"
    write_data_dir(data_dir)
    two = tmp_path / "two"
    common = {**COMMON, "optimizer": optimizer}
    result = torchrun(*tiny_flags(data_dir, two, batch_size=4, **common), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("parameters (d_model") == 1  # rank 0 alone prints
    assert "2 processes" in result.stderr

    one = tmp_path / "one"
    train(config_for(data_dir, one, batch_size=8, **common))  # one process, in this one

    # Same windows per step, loss averaged over ranks, gradients all-reduced: the same run.
    for got, expected in [
        (train_losses(two), train_losses(one)),
        (val_losses(two), val_losses(one)),
    ]:
        assert [step for step, _ in got] == [step for step, _ in expected]
        losses = [loss for _, loss in expected]
        assert [loss for _, loss in got] == pytest.approx(losses, rel=TOLERANCE[optimizer])
    state = ckpt.read_state(ckpt.latest_checkpoint(two))
    assert state.world_size == 2 and state.tokens_seen == 8 * 2 * 8 * 32

    # Lose the last checkpoint (as if killed just before it was written): a distributed resume
    # redoes steps 5-8 from step 4 and logs bit for bit what it logged the first time.
    first_time = train_losses(two)
    shutil.rmtree(ckpt.latest_checkpoint(two))
    result = torchrun(*tiny_flags(data_dir, two, batch_size=4, **common), "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    assert train_losses(two) == first_time


RANK0_FAILS = """
import torch.distributed as dist
from mllm.distributed import distributed_from_env
from mllm.distributed import on_rank0

info = distributed_from_env()
dist.init_process_group("gloo")
def decide():
    raise OSError("disk gone")
try:
    on_rank0(decide, info)
except Exception as e:
    print(f"rank {info.rank}: {type(e).__name__}: {e}", flush=True)
dist.destroy_process_group()
"""


def test_any_error_on_rank0_reaches_every_rank(tmp_path: Path) -> None:
    """Not only MllmError: an error rank 0 meets while deciding must not leave the other ranks
    waiting at the broadcast forever."""
    script = tmp_path / "rank0_fails.py"
    script.write_text(RANK0_FAILS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(script)]
    env = {**os.environ, **CLI_ENV}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank 0: OSError: disk gone" in result.stdout
    assert "rank 1: MllmError: rank 0: OSError('disk gone')" in result.stdout
