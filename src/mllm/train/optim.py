"""The optimizer of a run: AdamW alone, or Muon for the blocks' matrices beside AdamW.

Which tensor gets what:

  --optimizer adamw   every matrix (embeddings, linear weights) AdamW with weight decay; the
                      vectors (LayerNorm gains and biases) AdamW without
  --optimizer muon    the blocks' linear weights Muon (train/muon.py; fused Q·K·V and gate·up
                      split into their parts); the token embedding (= the tied head) and the
                      position table AdamW with weight decay; the vectors AdamW without

Every group carries its peak learning rate (`peak_lr`: --lr for AdamW's, --muon-lr for Muon's)
and the loop sets `lr = peak_lr x the schedule's factor` (train/schedule.py) before each step.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from mllm.config import TrainConfig
from mllm.model import GPT
from mllm.train.muon import Muon


class CombinedOptimizer:
    """Several optimizers stepped as one: what the loop, the gradient scaler, clipping and
    checkpoints see is one object with one `param_groups` list and one state dict."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError("the saved optimizer state is not this run's optimizers")
        for optimizer, optimizer_state in zip(self.optimizers, saved, strict=True):
            optimizer.load_state_dict(optimizer_state)


Optimizer = torch.optim.AdamW | CombinedOptimizer


def parameter_groups(model: GPT, optimizer: str) -> dict[str, list[nn.Parameter]]:
    """The model's parameters by group name: "muon_N" (Muon, N parts per matrix), "decay" and
    "no_decay" (AdamW with and without weight decay). See the module docstring."""
    fused = model.fused_parts()
    groups: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() < 2:
            key = "no_decay"
        elif optimizer == "muon" and name.startswith("blocks."):
            key = f"muon_{fused.get(name, 1)}"
        else:
            key = "decay"
        groups.setdefault(key, []).append(param)
    return groups


def build_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> Optimizer:
    """The run's optimizer (see the module docstring). AdamW is fused where the device supports
    it (one kernel for the whole update instead of one per tensor)."""
    groups = parameter_groups(model, config.optimizer)
    adamw_groups = [
        {"params": groups[key], "name": key} for key in ("decay", "no_decay") if key in groups
    ]
    kwargs: dict = {"lr": config.lr, "eps": 1e-8}
    if _fused_supported(device):
        kwargs["fused"] = True
    adamw = torch.optim.AdamW(adamw_groups, **kwargs)
    if config.optimizer == "adamw":
        optimizer: Optimizer = adamw
    else:
        muon_groups = [
            {"params": params, "name": key, "parts": int(key.removeprefix("muon_"))}
            for key, params in sorted(groups.items())
            if key.startswith("muon_")
        ]
        optimizer = CombinedOptimizer([Muon(muon_groups, lr=config.muon_lr), adamw])
    set_hyperparameters(optimizer, config)
    return optimizer


def set_hyperparameters(optimizer: Optimizer, config: TrainConfig) -> None:
    """The config's peak learning rates, weight decays, betas and momentum, in the optimizer's
    groups. Loading a checkpoint's optimizer state brings the saved values back, so a resumed
    run calls this again to take the options given this time."""
    for group in optimizer.param_groups:
        if group["name"].startswith("muon_"):
            group["peak_lr"] = config.muon_lr
            group["momentum"] = config.muon_momentum
            group["weight_decay"] = config.muon_weight_decay
            group["ns_steps"] = config.muon_ns_steps
        else:
            group["peak_lr"] = config.lr
            group["betas"] = (config.beta1, config.beta2)
            group["weight_decay"] = config.weight_decay if group["name"] == "decay" else 0.0


def load_optimizer_state(optimizer: Optimizer, saved: dict[str, Any], config: TrainConfig) -> None:
    """A checkpoint's optimizer state, then the hyperparameters given this time (a resume's
    options win). torch replaces each group's settings with the saved ones, so the groups'
    names are put back too (a checkpoint of mllm 0.1.0 saved none)."""
    names = [group["name"] for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, name in zip(optimizer.param_groups, names, strict=True):
        group["name"] = name
    set_hyperparameters(optimizer, config)


def set_learning_rates(optimizer: Optimizer, factor: float) -> None:
    """Every group at `factor` (the schedule's, train/schedule.py) times its peak."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor


def _fused_supported(device: torch.device) -> bool:
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    return device.type in ("cuda", "cpu", "mps")
