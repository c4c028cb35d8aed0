"""The step-memory estimate (train/memory.py) against the tensors autograd really keeps, its
warning, and --activation-checkpointing: the same loss and gradients from far fewer saved bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures import config_for, write_data_dir
from mllm.config import ModelConfig, TrainConfig
from mllm.model import GPT
from mllm.train import memory, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def saved_bytes(model: GPT, batch: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct storages the training loss's forward saves for the backward."""
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    config = model.config
    x = torch.randint(0, config.vocab_size, (batch, config.context))
    y = torch.randint(0, config.vocab_size, (batch, config.context))
    with (
        torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor),
        torch.autocast("cpu", dtype, enabled=dtype != torch.float32),
    ):
        model.loss(x, y)
    return sum(storages.values())


def saved_per_token(config: ModelConfig, dtype: torch.dtype, checkpointing: bool) -> float:
    """Saved bytes per token: the slope between two batch sizes (weights' copies cancel out)."""
    model = GPT(config)
    model.checkpoint_activations = checkpointing
    small, large = saved_bytes(model, 2, dtype), saved_bytes(model, 6, dtype)
    return (large - small) / (4 * config.context)


SHAPES = [
    ModelConfig(d_model=64, layers=2, heads=4, context=32, vocab_size=300),
    ModelConfig(d_model=96, layers=3, heads=2, context=48, vocab_size=128),
]


@pytest.mark.parametrize("config", SHAPES, ids=["d64", "d96"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_activation_estimate_counts_what_autograd_saves(
    config: ModelConfig, dtype: torch.dtype
) -> None:
    half = dtype == torch.bfloat16
    # Exact with torch 2.13's CPU kernels; 2% leaves room for another attention kernel's state.
    measured = saved_per_token(config, dtype, checkpointing=False)
    estimate = memory.activation_bytes_per_token(config, half, checkpointing=False)
    assert measured == pytest.approx(estimate, rel=0.02)
    # Checkpointed: the forward keeps each block's input; the estimate adds the one block that
    # its backward recomputes at a time.
    measured = saved_per_token(config, dtype, checkpointing=True)
    estimate = memory.activation_bytes_per_token(config, half, checkpointing=True)
    assert measured == pytest.approx(
        estimate - memory.block_bytes_per_token(config, half), rel=0.02
    )
    assert estimate < memory.activation_bytes_per_token(config, half, checkpointing=False)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(dropout: float) -> None:
    """Recomputed blocks see the same dropout masks (torch's checkpoint restores the RNG)."""
    config = ModelConfig(d_model=32, layers=3, heads=2, context=16, vocab_size=64, dropout=dropout)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(config)
        model.checkpoint_activations = checkpointing
        loss = model.loss(x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss, loss_ckpt)
    for grad, grad_ckpt in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(grad_ckpt, grad, rtol=1e-6, atol=1e-7)


def test_checkpointing_applies_to_training_only() -> None:
    """Decoding with a cache and no-grad scoring run the blocks as they are."""
    config = ModelConfig(d_model=32, layers=2, heads=2, context=16, vocab_size=64)
    model = GPT(config)
    model.checkpoint_activations = True
    with torch.no_grad():
        assert model(torch.randint(0, 64, (1, 8))).shape == (1, 8, 64)


def bench_config(**overrides: object) -> TrainConfig:
    model = {"d_model": 1024, "layers": 16, "heads": 16, "context": 1024, "vocab_size": 16000}
    return TrainConfig(data_dir="d", run_dir="r", model=model, batch_size=16, **overrides)


def estimate(config: TrainConfig, world_size: int = 1) -> memory.StepMemory:
    with torch.device("meta"):  # the shape, without allocating 220M parameters
        model = GPT(config.model)
    return memory.estimate_step_memory(model, config, torch.bfloat16, world_size)


def test_the_default_220m_model_estimate_and_what_each_option_saves() -> None:
    """The seed's example (the default model, batch 16, AdamW) peaked at 16 GB on a CPU."""
    adamw = estimate(bench_config(optimizer="adamw"))
    assert adamw.weights == adamw.gradients == 4 * 219_875_328
    assert adamw.optimizer == 2 * adamw.weights
    assert 15e9 < adamw.total < 18e9
    muon = estimate(bench_config(optimizer="muon"))
    assert muon.optimizer < adamw.optimizer  # one momentum per matrix, not two moments
    checkpointed = estimate(bench_config(optimizer="adamw", activation_checkpointing=True))
    assert checkpointed.activations < adamw.activations / 5
    sharded = estimate(bench_config(optimizer="adamw", fsdp=True), world_size=4)
    assert sharded.optimizer == adamw.optimizer // 4
    assert sharded.gradients == adamw.gradients // 4
    ddp = estimate(bench_config(optimizer="adamw"), world_size=4)
    assert ddp.gradients == 2 * adamw.gradients  # DDP's buckets


def test_warning_names_the_flags_that_make_the_step_fit() -> None:
    config = bench_config(optimizer="adamw")
    need = estimate(config)
    cpu = torch.device("cpu")
    assert memory.too_big_warning(need, need.total + 1, cpu, config, 1) is None
    assert memory.too_big_warning(need, None, cpu, config, 1) is None
    warning = memory.too_big_warning(need, 8 * 10**9, cpu, config, 2)
    assert warning is not None and "\n" not in warning
    assert "more than the 8.0 GB free on cpu" in warning
    for flag in ("--batch-size", "--grad-accum", "--activation-checkpointing", "--fsdp"):
        assert flag in warning
    checkpointed = config.model_copy(update={"activation_checkpointing": True})
    assert "--activation-checkpointing" not in memory.too_big_warning(need, 1, cpu, checkpointed, 1)


def test_train_prints_the_estimate_and_warns_when_it_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    write_data_dir(data_dir)
    monkeypatch.setattr(memory, "free_memory", lambda device: 1_000_000)
    train(config_for(data_dir, tmp_path / "run", max_steps=1, activation_checkpointing=True))
    err = capsys.readouterr().err
    assert "memory per process: about" in err and "1 MB free on cpu" in err
    assert "warning" in err.lower() and "--batch-size" in err


def test_available_host_memory_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    assert memory.available_host_memory(meminfo) == 8_192_000_000
    meminfo.write_text("MemTotal: 1 kB\n")
    assert memory.available_host_memory(meminfo) is None
    assert memory.available_host_memory(tmp_path / "absent") is None
