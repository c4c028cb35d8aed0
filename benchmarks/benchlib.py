"""What the benchmarks share: the bench model's shape, and what each records about the machine it
ran on (imported by the bench_*.py scripts, which run with this folder on sys.path)."""

from __future__ import annotations

import os

from mllm.config import ModelConfig
from mllm.train.flops import machine_name

# The bench config of README.md and docs/: small enough for a laptop CPU, shaped like the real one.
BENCH_MODEL = ModelConfig(
    vocab_size=16_000, context=256, d_model=384, layers=6, heads=6, dropout=0.0
)
BENCH_BATCH_SIZE = 16  # sequences per step, where a benchmark trains


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): tells a run on busy cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
    """The CPU's model name, e.g. "AMD EPYC"."""
    return machine_name()
