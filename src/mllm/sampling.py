"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Parameters may differ per batch row, so a server can decode requests with different settings in
one batch; each row may have its own torch.Generator, so a seeded request gives the same text
whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one row's next token is drawn (already validated by the config/request models)."""

    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature-scaled logits with tokens outside each row's top-k / top-p set to -inf.

    logits: (B, V) float. Rows with temperature 0 are left unscaled (they are decoded greedily).
    Each row's maximum is subtracted before dividing (the softmax is the same): a temperature as
    small as 1e-179 then sends every other logit to -inf instead of the maximum to inf, whose
    softmax would be NaN. Temperatures under the logits' smallest normal number (which would
    round to 0) count as that number.
    """
    device = logits.device
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)
    temperature = temperature.to(logits.dtype).clamp(min=torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature[:, None]
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    needs_top_p = any(p.top_p < 1.0 for p in params)
    if not needs_top_p and all(k == vocab for k in top_k):
        return logits
    if not needs_top_p:  # top-k alone: a partial sort of k values per row is enough
        kth = torch.stack(
            [torch.topk(row, k).values[-1] for row, k in zip(logits, top_k, strict=True)]
        )
        return logits.masked_fill(logits < kth[:, None], float("-inf"))

    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    remove = ranks >= torch.tensor(top_k, device=device)[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it
    # already reaches top_p (so the most likely token always stays). Rows with top_p 1 are
    # left alone: a float32 cumsum reaches 1.0 before the tail, which would cut it.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    # (rank 0 is never dropped: a top_p that rounds to 0 in float32 would drop every token)
    cut = (mass_before >= top_p) & (top_p < 1.0) & (ranks > 0)
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Next token id per row, shape (B,), from logits (B, V)."""
    logits = logits.float()
    greedy = [p.temperature == 0 for p in params]
    if all(greedy):
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    generators = generators or [None] * len(params)
    tokens = []
    for row, is_greedy in enumerate(greedy):
        if is_greedy:
            tokens.append(logits[row].argmax().view(1))
        else:
            tokens.append(torch.multinomial(probs[row], 1, generator=generators[row]))
    return torch.cat(tokens)
