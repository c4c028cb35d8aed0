"""--fsdp: two gloo processes sharding the model train what one process trains, checkpoint the
same files, and resume on another number of processes (one, without torchrun, included); Muon is
refused or replaced, never silently sharded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fixtures import config_for, tiny_flags, train_losses, val_losses, write_data_dir
from mllm.config import ModelConfig, TrainConfig
from mllm.errors import UsageError
from mllm.model import GPT
from mllm.train import checkpoint as ckpt
from mllm.train import sharding, train
from mllm.train.optim import parameter_groups
from test_ddp import torchrun

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training on one thread

COMMON = {"max_steps": 8, "grad_accum": 2, "eval_interval": 4, "ckpt_interval": 4}
# Reduce-scatter sums in another order than one process's backward: a few fp32 ulps.
RELATIVE = 1e-5


@pytest.mark.slow
def test_two_sharded_processes_match_one_and_resume_anywhere(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    write_data_dir(data_dir)
    sharded = tmp_path / "sharded"
    flags = tiny_flags(data_dir, sharded, batch_size=4, **COMMON)
    result = torchrun(*flags, "--fsdp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP: weights, gradients and optimizer state sharded" in result.stderr
    assert "training with --optimizer adamw" in result.stderr  # Muon, the default, replaced

    one = tmp_path / "one"
    train(config_for(data_dir, one, batch_size=8, optimizer="adamw", **COMMON))
    for got, expected in [
        (train_losses(sharded), train_losses(one)),
        (val_losses(sharded), val_losses(one)),
    ]:
        assert [step for step, _ in got] == [step for step, _ in expected]
        losses = [loss for _, loss in expected]
        assert [loss for _, loss in got] == pytest.approx(losses, rel=RELATIVE)

    # The checkpoint is a one-process run's: whole tensors by the unwrapped model's names.
    latest = ckpt.latest_checkpoint(sharded)
    model = GPT(ckpt.read_state(latest).model)
    ckpt.load_weights(latest, model)  # strict: every name and shape
    saved = ckpt.read_trainer_state(latest)["optimizer"]
    groups = parameter_groups(model, "adamw")
    in_order = [param for name in ("decay", "no_decay") for param in groups[name]]
    for index, param in enumerate(in_order):  # the optimizer's ids: its groups' order
        assert saved["state"][index]["exp_avg"].shape == param.shape

    # Resume steps 5-8 from step 4, with a plain `--resume` on one process (no torchrun, no
    # --fsdp): the saved --fsdp is taken, and there is nothing to shard.
    shutil.rmtree(latest)
    resumed = train(config_for(data_dir, sharded, batch_size=8, resume=True, **COMMON))
    assert resumed.exit_code == 0
    assert [loss for _, loss in train_losses(sharded)] == pytest.approx(
        [loss for _, loss in train_losses(one)], rel=RELATIVE
    )

    # And the other way: one process's run resumed by two sharded ones.
    shutil.rmtree(ckpt.latest_checkpoint(one))
    result = torchrun(*tiny_flags(data_dir, one, batch_size=4, **COMMON), "--resume", "--fsdp",
                      cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    assert [loss for _, loss in train_losses(one)][-4:] == pytest.approx(
        [loss for _, loss in train_losses(sharded)][-4:], rel=RELATIVE
    )


def test_explicit_muon_with_fsdp_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    write_data_dir(data_dir)
    with pytest.raises(UsageError, match="--optimizer muon --fsdp: Muon needs each weight matrix"):
        train(config_for(data_dir, tmp_path / "run", optimizer="muon", fsdp=True, max_steps=1))


def test_fsdp_on_one_process_trains_unsharded_with_adamw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    write_data_dir(data_dir)
    train(config_for(data_dir, tmp_path / "run", fsdp=True, max_steps=2))
    err = capsys.readouterr().err
    assert "--fsdp: one process, nothing to shard" in err
    state = ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "run"))
    assert state.train_config.optimizer == "adamw" and state.train_config.fsdp


def check_sharded_step(device: torch.device, rendezvous: Path) -> None:
    """In a process group of one rank in this process (fully_shard runs as on many): a step of
    the sharded model equals the plain model's; gathering the weights and the AdamW state gives
    the plain ones; a loaded full state sharded back steps again. test_cuda runs it on a GPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=0, world_size=1)
    try:
        config = ModelConfig(d_model=16, layers=2, heads=2, context=8, vocab_size=32)
        torch.manual_seed(0)
        plain = GPT(config).to(device)
        shard = GPT(config).to(device)
        shard.load_state_dict(plain.state_dict())
        sharding.shard_model(shard, device, 1, compile_blocks=False)
        assert sharding.is_sharded(shard) and not sharding.is_sharded(plain)
        x = torch.randint(0, 32, (2, 8), device=device)
        y = torch.randint(0, 32, (2, 8), device=device)
        optimizers = []
        for model in (plain, shard):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            model.loss(x, y).backward()
            optimizer.step()
            optimizers.append(optimizer)
        gathered = sharding.full_weights(shard)
        for name, tensor in plain.state_dict().items():
            torch.testing.assert_close(gathered[name], tensor.cpu())
        state = sharding.full_optimizer_state(optimizers[1])
        for index, param in enumerate(plain.parameters()):
            expected = optimizers[0].state[param]["exp_avg"]
            torch.testing.assert_close(state["state"][index]["exp_avg"], expected)
        assert sharding.full_weights(shard, keep=False) is None  # a rank that does not write
        optimizers[1].load_state_dict(sharding.shard_saved_optimizer_state(optimizers[1], state))
        param = next(shard.parameters())
        assert type(optimizers[1].state[param]["exp_avg"]) is type(param)  # a DTensor again
        shard.loss(x, y).backward()
        optimizers[1].step()  # the reloaded state steps
    finally:
        dist.destroy_process_group()


def test_sharded_step_and_gathered_state_equal_the_unsharded(tmp_path: Path) -> None:
    check_sharded_step(torch.device("cpu"), tmp_path / "rendezvous")


def test_fsdp_with_fp16_is_refused() -> None:
    """fp16's gradient scaler would skip a step on some shards and not on others (CPUs do not
    train in fp16, so this is the check a pre-Ampere GPU run meets)."""
    config = TrainConfig(data_dir="d", run_dir="r", fsdp=True, optimizer="adamw")
    with pytest.raises(UsageError, match=r"--fsdp with fp16 .* is not supported"):
        sharding.check_precision(config, 2, torch.float16)
    sharding.check_precision(config, 2, torch.bfloat16)
    sharding.check_precision(config, 1, torch.float16)  # one process: nothing is sharded
