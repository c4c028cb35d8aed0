"""Summed next-token negative log-likelihood over a list of windows: the one loss computation
shared by training's periodic validation and `mllm eval`."""

from __future__ import annotations

import numpy as np
import torch

from mllm.data.loader import TokenWindows
from mllm.device import autocast
from mllm.model import GPT


@torch.no_grad()
def sum_nll(
    model: GPT,
    windows: TokenWindows,
    starts: np.ndarray,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    chunk_rows: int | None = None,
) -> tuple[float, int]:
    """(total nats, tokens scored) of `model` over the windows starting at `starts`.

    Sums in float64 so the result does not depend on how the windows are batched. The head
    runs `chunk_rows` positions at a time (`GPT.token_nll`).
    """
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    for first in range(0, len(starts), batch_size):
        x, y = windows.gather(starts[first : first + batch_size])
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            nll = model.token_nll(x, y, chunk_rows)
        total += nll.to("cpu", torch.float64).sum().item()  # one sync per batch; MPS: no float64
        count += y.numel()
    model.train(was_training)
    return total, count
