"""One optimizer step, tuned for speed (docs/training-speed.md says what each choice measured).

The contract the loop relies on: `train_step` returns the step's mean loss and the gradient norm
before clipping, as device tensors (reading them would wait for the device), and keeps the
numerics of a plain autocast forward + backward + clip + AdamW.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mllm.config import TrainConfig
from mllm.device import autocast
from mllm.distributed import DistributedInfo
from mllm.model import GPT
from mllm.train.cpu_memory import retain_freed_memory
from mllm.train.sharding import full_tensor, is_sharded, shard_model


class TrainingLoss(nn.Module):
    """GPT.loss as a module's forward: torch.compile then traces the loss with the model, and
    DDP's forward (which prepares the gradient all-reduce) runs on every step."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


def prepare_model(
    model: GPT, config: TrainConfig, device: torch.device, dist_info: DistributedInfo
) -> nn.Module:
    """The module `train_step` calls: the training loss, compiled when asked, then wrapped in
    DDP when distributed; with --fsdp under torchrun, `model` is sharded in place instead
    (train/sharding.py: build the optimizer after this). It shares its parameters with `model`."""
    if device.type == "cpu":
        retain_freed_memory()  # reuse freed activations: no page faults per step (cpu_memory.py)
    model.checkpoint_activations = config.activation_checkpointing
    if config.fsdp and dist_info.enabled:
        shard_model(model, device, dist_info.world_size, compile_blocks=config.compile)
        return TrainingLoss(model)
    module: nn.Module = TrainingLoss(model)
    if config.compile:
        module = torch.compile(module)
    if dist_info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=device_ids)
    return module


def train_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `micro_batches` (gradient accumulation; ranks synchronise
    gradients on the last micro-batch only). Returns the step's mean loss and the gradient norm
    before clipping, as device tensors: reading them would wait for the device."""
    accum = len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    for index, (x, y) in enumerate(micro_batches):
        with gradient_sync(module, enabled=index == accum - 1):
            with autocast(device, dtype):
                loss = module(x, y)
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    grad_norm = full_tensor(grad_norm)  # sharded gradients: the norm over every rank's shards
    scaler.step(optimizer)  # skips the update when fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum, grad_norm


def gradient_sync(module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() for the micro-batches whose gradients are only accumulated; FSDP's
    equivalent switch (its gradients are reduce-scattered on the last micro-batch only)."""
    if isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else module.no_sync()
    sharded = getattr(module, "model", None)
    if is_sharded(sharded):
        sharded.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def to_device(
    batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) on the device; on CUDA through pinned memory, so the copy overlaps the GPU's work."""
    if device.type == "cuda":
        x, y = (t.contiguous().pin_memory().to(device, non_blocking=True) for t in batch)
        return x, y
    return batch[0].to(device), batch[1].to(device)
