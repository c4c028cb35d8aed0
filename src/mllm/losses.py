"""The output head and cross-entropy fused, so the full (tokens x vocab) logits never exist.

A plain head + loss materialises logits of tokens x vocab (4,096 x 16,000 = 65M values: 262 MB in
fp32), keeps them for backward, and walks them several times. Here the rows go through in chunks:
each chunk's logits are computed, reduced to its loss, and - when gradients are wanted - turned
into that chunk's gradient right away (softmax minus one-hot), which two more matmuls take to the
gradients of the hidden states and of the head weight. Backward then only scales what forward
already computed. So a step does 3 head matmuls (no recomputation) and never holds more than one
chunk of logits.

Numerics match `F.cross_entropy(F.linear(hidden, weight).float(), targets)` under the same
autocast: the matmuls run in the autocast dtype, the softmax and the loss in fp32 (fp64 inputs
stay fp64, which the tests use to check value and gradients exactly).
"""

from __future__ import annotations

import torch
from torch import autograd

# Logits per chunk (rows x vocab): 1,024 rows at vocab 16,000, 64 MB in fp32. Measured on the
# bench config (4,096 rows; 2-core Zen 4, bf16): 512 and 1,024 rows gave the same step time, one
# 4,096-row piece was ~5% slower (the forward head matmul alone: 395 GFLOP/s in 1,024-row pieces,
# 295 in one). On GPUs this is also the size Liger-Kernel's fused linear cross-entropy picks for
# 16k tokens of width 1,024 (chunk x vocab ~ tokens x width).
CHUNK_LOGITS = 1024 * 16_000


def rows_per_chunk(vocab_size: int) -> int:
    """Rows of one chunk: about CHUNK_LOGITS logits, at least 64 rows."""
    return max(64, CHUNK_LOGITS // vocab_size)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, without the full logits.

    hidden: (..., d) final hidden states; weight: (vocab, d) output head; targets: (...) token
    ids, all counted (no ignore index). Matmuls run in the autocast dtype when autocast is on
    for hidden's device, else in hidden's dtype. `chunk_rows` defaults to rows_per_chunk(vocab).
    """
    if chunk_rows is None:
        chunk_rows = rows_per_chunk(weight.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype
    return _LinearCrossEntropy.apply(
        hidden.flatten(0, -2), weight, targets.flatten(), chunk_rows, compute_dtype
    )


class _LinearCrossEntropy(autograd.Function):
    """Forward computes the mean loss and, when needed, both gradients; backward scales them."""

    @staticmethod
    def forward(
        ctx: autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_rows: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        needs_hidden_grad, needs_weight_grad = ctx.needs_input_grad[:2]
        wants_grad = needs_hidden_grad or needs_weight_grad
        rows = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            loss_dtype = torch.promote_types(compute_dtype, torch.float32)
            loss_sum = torch.zeros((), device=hidden.device, dtype=loss_dtype)
            grad_hidden = torch.empty_like(h) if needs_hidden_grad else None
            grad_weight = (
                torch.zeros(weight.shape, device=weight.device, dtype=loss_dtype)
                if needs_weight_grad
                else None
            )
            for start in range(0, rows, chunk_rows):
                end = min(start + chunk_rows, rows)
                h_chunk = h[start:end]
                logits = (h_chunk @ w.T).to(loss_dtype)
                chunk_loss, grad_logits = _chunk_loss_and_grad(
                    logits, targets[start:end], wants_grad
                )
                loss_sum += chunk_loss
                if grad_logits is None:
                    continue
                # Gradients of the summed loss here; backward applies the mean's 1/rows in fp32
                # (in fp16 it would push small gradients below the smallest representable value).
                # Not as add_(..., alpha=1/rows): inductor (torch 2.13) fuses that into an addmm
                # and drops the alpha (tests/test_losses.py checks the compiled gradients).
                grad_logits = grad_logits.to(compute_dtype)
                if grad_hidden is not None:
                    torch.matmul(grad_logits, w, out=grad_hidden[start:end])
                if grad_weight is not None:
                    grad_weight += grad_logits.T @ h_chunk
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
        )
        ctx.input_dtypes = (hidden.dtype, weight.dtype)
        ctx.rows = rows
        return loss_sum / rows

    @staticmethod
    def backward(
        ctx: autograd.function.FunctionCtx, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.input_dtypes
        needs_hidden_grad, needs_weight_grad = ctx.needs_input_grad[:2]
        d_hidden = d_weight = None
        # Scaled in (at least) fp32, then cast to the inputs' dtypes.
        if needs_hidden_grad:
            wide = torch.promote_types(grad_hidden.dtype, torch.float32)
            d_hidden = (grad_hidden.to(wide) * (grad_loss.to(wide) / ctx.rows)).to(hidden_dtype)
        if needs_weight_grad:
            d_weight = (grad_weight * (grad_loss / ctx.rows)).to(weight_dtype)
        return d_hidden, d_weight, None, None, None


def _chunk_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, wants_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed loss of one chunk of fp32 logits, and its gradient (softmax - one-hot) if wanted.

    The gradient is computed in place over `logits` (it is the chunk's last use).
    """
    log_norm = torch.logsumexp(logits, dim=1)
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    chunk_loss = (log_norm - target_logits).sum()
    if not wants_grad:
        return chunk_loss, None
    probs = logits.sub_(log_norm[:, None]).exp_()
    probs.scatter_add_(1, targets[:, None], probs.new_full((targets.shape[0], 1), -1.0))
    return chunk_loss, probs
