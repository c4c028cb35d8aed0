"""Summed next-token negative log-likelihood over a list of windows: the one loss computation
shared by training's periodic validation and `mllm eval`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mllm.data.loader import TokenWindows
from mllm.device import autocast
from mllm.losses import rows_per_chunk
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
    runs `chunk_rows` positions at a time (default: losses.rows_per_chunk).
    """
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    for first in range(0, len(starts), batch_size):
        x, y = windows.gather(starts[first : first + batch_size])
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            hidden = model.hidden_states(x).flatten(0, 1)
            targets = y.flatten()
            # The head in row chunks, as training's loss does: never the whole batch's logits
            # (8 windows of 1,024 at vocab 16,000 would be 0.5 GB in fp32).
            step = chunk_rows or rows_per_chunk(model.head_weight.shape[0])
            nll = torch.cat(
                [
                    F.cross_entropy(
                        F.linear(hidden[row : row + step], model.head_weight).float(),
                        targets[row : row + step],
                        reduction="none",
                    )
                    for row in range(0, len(targets), step)
                ]
            )
        total += nll.to("cpu", torch.float64).sum().item()  # one sync per batch; MPS: no float64
        count += y.numel()
    model.train(was_training)
    return total, count
