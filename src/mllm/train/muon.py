"""Muon for the hidden matrices, with fused matrices orthogonalised as their separate parts.

Muon (Keller Jordan, 2024) replaces each matrix's momentum by its nearest semi-orthogonal matrix
(a Newton-Schulz iteration in bf16), so every direction of the update moves at the same rate.
Its update rule here is torch.optim.Muon's (same coefficients, Nesterov momentum as a lerp,
decoupled weight decay, the "original" sqrt(max(1, rows / cols)) learning-rate scale), and
tests check the two agree on a plain matrix. It is its own class because torch's orthogonalises
a parameter as one matrix: the model fuses Q, K, V into one (3·d, d) weight and gate, up into one
(2·h, d) weight, and orthogonalising the stack would couple parts that are separate linear maps.
Here a parameter of `parts` parts is split along its rows and each part is orthogonalised and
scaled by its own shape. Parts of the same shape (every layer's Q, K, V, ...) go through the
iteration together as one batched matmul, a few large kernels instead of many small ones.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (and Keller Jordan's)
NS_STEPS = 5
EPS = 1e-7


def orthogonalise(updates: Tensor, steps: int = NS_STEPS) -> Tensor:
    """Approximately U·Vᵀ of each matrix of a (N, rows, cols) stack, by the quintic
    Newton-Schulz iteration in bf16 (singular values land in about [0.7, 1.2], which trains as
    well as the exact U·Vᵀ)."""
    a, b, c = NS_COEFFICIENTS
    x = updates.bfloat16()
    tall = x.size(1) > x.size(2)
    if tall:
        x = x.transpose(1, 2)
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=EPS)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.transpose(1, 2)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G²
        x = torch.baddbmm(x, poly, x, beta=a)  # a·X + poly·X
    return x.transpose(1, 2) if tall else x


def shape_scale(rows: int, cols: int) -> float:
    """torch.optim.Muon's "original" learning-rate scale: taller matrices take larger steps, so
    the update's RMS is about the same whatever the shape."""
    return math.sqrt(max(1.0, rows / cols))


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters. A group's `parts` (default 1) says into how many equal row
    blocks each of its parameters splits before orthogonalising."""

    def __init__(
        self,
        params: list[dict],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = NS_STEPS,
    ) -> None:
        defaults = {
            "ns_steps": ns_steps,
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "parts": 1,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2 or p.size(0) % group["parts"]:
                    raise ValueError(
                        f"Muon takes 2-D parameters whose rows split into {group['parts']} "
                        f"parts, not shape {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # (rows, cols, iterations) of a part -> the parts of that shape, each (param, group, row
        # slice, update).
        by_shape: dict[tuple[int, int, int], list[tuple[Tensor, dict, slice, Tensor]]] = (
            defaultdict(list)
        )
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = [self._momentum_buffer(p) for p in params]
            # One kernel per list instead of two per matrix: buf <- lerp(buf, grad, 1 - momentum),
            # and Nesterov's look-ahead update = lerp(grad, buf, momentum).
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            updates = (
                torch._foreach_lerp(grads, buffers, group["momentum"])
                if group["nesterov"]
                else buffers
            )
            for p, update in zip(params, updates, strict=True):
                rows = p.size(0) // group["parts"]
                for index in range(group["parts"]):
                    part = slice(index * rows, (index + 1) * rows)
                    shape = (rows, p.size(1), group["ns_steps"])
                    by_shape[shape].append((p, group, part, update[part]))
        for (rows, cols, steps), parts in by_shape.items():
            # Stacked straight into bf16, the iteration's dtype: one copy, not a stack then a cast.
            stacked = torch.empty(
                (len(parts), rows, cols), dtype=torch.bfloat16, device=parts[0][0].device
            )
            for slot, (*_, update) in zip(stacked, parts, strict=True):
                slot.copy_(update)
            ortho = orthogonalise(stacked, steps)
            scale = shape_scale(rows, cols)
            decayed: set[int] = set()
            for (p, group, part, _), o in zip(parts, ortho, strict=True):
                if id(p) not in decayed and group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, once per tensor
                decayed.add(id(p))
                p[part].add_(o, alpha=-group["lr"] * scale)  # bf16 into fp32: exact widening
        return loss

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        return state["momentum_buffer"]
