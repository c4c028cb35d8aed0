"""AdamW with weight decay on matrices only, and the learning-rate schedule.

The schedule is a pure function of the step and the run's total steps, so a resumed run follows
exactly the schedule an uninterrupted run would have.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from mllm.config import TrainConfig


def build_optimizer(
    model: nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters: matrices (embeddings and linear weights) decay, vectors
    (LayerNorm gains and biases) do not. Fused where the device supports it (one kernel for the
    whole update instead of one per tensor)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2]},
    ]
    kwargs: dict = {"lr": config.lr, "eps": 1e-8}
    if _fused_supported(device):
        kwargs["fused"] = True
    optimizer = torch.optim.AdamW(groups, **kwargs)
    set_hyperparameters(optimizer, config)
    return optimizer


def set_hyperparameters(optimizer: torch.optim.AdamW, config: TrainConfig) -> None:
    """The config's weight decay (matrices only) and betas, in the optimizer's groups. Loading a
    checkpoint's optimizer state brings the saved values back, so a resumed run calls this
    again to take the options given this time (the lr is set at every step anyway)."""
    matrices, vectors = optimizer.param_groups
    matrices["weight_decay"] = config.weight_decay
    vectors["weight_decay"] = 0.0
    for group in optimizer.param_groups:
        group["betas"] = (config.beta1, config.beta2)


def _fused_supported(device: torch.device) -> bool:
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    return device.type in ("cuda", "cpu", "mps")


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to `lr` over
    `warmup_steps`, then cosine decay to `min_lr` at `total_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if step >= total_steps:
        return config.min_lr
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = (step - config.warmup_steps) / decay_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr + cosine * (config.lr - config.min_lr)
