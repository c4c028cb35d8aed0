"""What every benchmark records about the machine it ran on (imported by the bench_*.py scripts,
which run with this folder on sys.path)."""

from __future__ import annotations

import os

from mllm.train.flops import machine_name


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): tells a run on busy cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
    """The CPU's model name, e.g. "AMD EPYC"."""
    return machine_name()
