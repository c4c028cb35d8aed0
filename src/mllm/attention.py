"""Causal self-attention for training: PyTorch's fused kernel, with a faster backward on CPU.

The maths is softmax(q·kᵀ / sqrt(head_dim) + causal mask)·v, as
`F.scaled_dot_product_attention(q, k, v, is_causal=True)` computes it. On a CPU, for the short
contexts small models train at, PyTorch's flash-attention backward is several times slower than
its forward (measured on a 2-core Xeon with AMX, bf16, compiled, 16 x 6 heads x 256 positions x
64: forward 4 ms, backward ~27 ms per layer). So on CPU, at up to MATMUL_BACKWARD_MAX_LENGTH
positions, the forward is that same flash kernel (which also returns each row's log-sum-exp) and
the backward is written out as five batched matmuls and the softmax's gradient, which
`torch.compile` fuses around the matmuls: ~17 ms per layer in all against ~31 (whole step: see
docs/training-speed.md). It recomputes the attention weights from the saved log-sum-exp, so it
keeps for backward exactly what the flash kernel keeps (q, k, v, the output, one float per row);
the (T x T) weights exist only inside one layer's backward. At longer contexts the flash backward
wins (measured at 512 positions: even; at 1,024: the flash backward took half the time), and on
GPUs the flash backward is the fast one: both keep PyTorch's kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import autograd

# Longest sequence whose CPU backward runs as matmuls (measured above: faster at 128 and 256
# positions, even at 512, slower at 1,024).
MATMUL_BACKWARD_MAX_LENGTH = 256

_flash_attention_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0
) -> torch.Tensor:
    """Causal attention of q, k, v (batch, heads, positions, head_dim), as
    `F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)`."""
    if uses_matmul_backward(q, dropout):
        return FlashForwardMatmulBackward.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=q.size(-2) > 1)


def uses_matmul_backward(q: torch.Tensor, dropout: float) -> bool:
    """Whether this call takes the CPU backward written as matmuls (see the module docstring):
    a gradient is wanted, on CPU, without dropout, at up to MATMUL_BACKWARD_MAX_LENGTH
    positions, where this PyTorch has the CPU flash kernel."""
    return (
        _flash_attention_cpu is not None
        and q.device.type == "cpu"
        and dropout == 0.0
        and torch.is_grad_enabled()
        and q.requires_grad
        and q.size(-2) <= MATMUL_BACKWARD_MAX_LENGTH
    )


class FlashForwardMatmulBackward(autograd.Function):
    """Forward by the CPU flash kernel, backward by matmuls from its saved log-sum-exp."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, logsumexp = _flash_attention_cpu(q, k, v, 0.0, True)[:2]
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, logsumexp = ctx.saved_tensors
        return attention_backward(q, k, v, out, logsumexp, grad_out)


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of causal attention with respect to q, k and v.

    With scores S = q·kᵀ·scale and weights P = exp(S - logsumexp) (zero above the diagonal):
    dv = Pᵀ·dO, dP = dO·vᵀ, dS = P ⊙ (dP - rowsum(dO ⊙ out)) · scale, dq = dS·k, dk = dSᵀ·q.
    The matmuls run in the inputs' dtype (bf16 under autocast), the softmax's gradient in fp32
    (fp64 inputs stay fp64), as the flash kernel does.
    """
    wide = torch.promote_types(q.dtype, torch.float32)
    length = q.size(-2)
    scale = q.size(-1) ** -0.5
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-2, -1)).to(wide) * scale
    weights = torch.exp(scores - logsumexp.unsqueeze(-1)).masked_fill(~causal, 0.0)
    grad_v = weights.to(q.dtype).transpose(-2, -1) @ grad_out
    grad_weights = (grad_out @ v.transpose(-2, -1)).to(wide)
    row_dot = (grad_out.to(wide) * out.to(wide)).sum(-1, keepdim=True)
    grad_scores = (weights * (grad_weights - row_dot) * scale).to(q.dtype)
    return grad_scores @ k, grad_scores.transpose(-2, -1) @ q, grad_v
