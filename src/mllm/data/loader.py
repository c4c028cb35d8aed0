"""Windows of `context + 1` tokens over a packed .bin, for training and evaluation.

A window starting at token s gives x = tokens[s : s+context] and y = tokens[s+1 : s+context+1].
Batches are gathered with one vectorised fancy index over a memmap that each process (or
DataLoader worker) opens once, never once per batch. Which windows come next is decided by the
caller from explicit state (a numpy Generator for random windows, a cursor for ordered ones), so
that state can be checkpointed and a resumed run sees exactly the windows it would have seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mllm.errors import MllmError


class TokenWindows:
    """Random or strided windows of `context + 1` tokens over one token file."""

    def __init__(self, path: str | Path, dtype: str | np.dtype, context: int) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")  # pack writes little-endian bins
        self.context = context
        self._tokens: np.memmap | None = None  # opened lazily: once per process / worker
        if context < 1:
            raise MllmError(f"context must be at least 1 (got {context})")
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise MllmError(f"{self.path} not found: run `mllm pack` first") from None
        if size % self.dtype.itemsize:
            raise MllmError(f"{self.path} is not a whole number of {self.dtype.name} tokens")
        self.n_tokens = size // self.dtype.itemsize
        if self.n_tokens < context + 1:
            raise MllmError(
                f"{self.path} holds {self.n_tokens} tokens, fewer than one window of context "
                f"{context} + 1: use a smaller --context or pack more text"
            )

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict:
        # A memmap is not sent to DataLoader workers or other processes: each reopens its own.
        return {**self.__dict__, "_tokens": None}

    @property
    def max_start(self) -> int:
        """Largest valid window start (inclusive)."""
        return self.n_tokens - self.context - 1

    def num_windows(self, stride: int | None = None) -> int:
        """Number of windows at `stride` (default: context, i.e. non-overlapping)."""
        stride = stride or self.context
        return self.max_start // stride + 1

    def random_starts(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """`count` uniformly random window starts drawn from `rng` (advancing it)."""
        return rng.integers(0, self.max_start + 1, size=count, dtype=np.int64)

    def strided_starts(self, first: int, count: int, stride: int | None = None) -> np.ndarray:
        """Starts of windows first, first+1, ... at `stride`, wrapping round at the end."""
        stride = stride or self.context
        index = (first + np.arange(count, dtype=np.int64)) % self.num_windows(stride)
        return index * stride

    def gather(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape (len(starts), context) in one vectorised index.

        Both are contiguous (so `.view(-1)` works on them) and y is x shifted by one token.
        """
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if starts.size and (starts.min() < 0 or starts.max() > self.max_start):
            raise IndexError(f"window starts must lie in [0, {self.max_start}] for {self.path}")
        offsets = np.arange(self.context + 1, dtype=np.int64)
        windows = np.asarray(self.tokens[starts[:, None] + offsets[None, :]], dtype=np.int64)
        return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())
