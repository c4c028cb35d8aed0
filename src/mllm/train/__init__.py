"""A training run's parts: the loop (loop.py), what a checkpoint holds and how the run dir is laid
out (checkpoint.py), what makes a resume exact (resume.py), the optimizer and its schedule
(optim.py), metrics and the live display (metrics.py), FLOPs and MFU (flops.py).

`mllm.train.train` is the entry point `mllm train` calls. It is imported on first use, so that
eval, generate and serve can read checkpoints (mllm.train.checkpoint) without importing the loop.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mllm.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
