"""Peak matmul throughput of a device, the denominator of MFU (model FLOPs utilisation).

On CUDA the dense peak comes from a table of known GPUs. Elsewhere (CPU, MPS, unknown GPUs) it is
measured with a large matmul in the precision in use, as PERF.md did. A measurement taken while
other work shares the device comes out low (and MFU above 100%), so the best measurement seen on
this machine is remembered in the user's cache folder and used when it is higher.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path

import torch

from mllm.device import synchronize
from mllm.fileio import atomic_write_json

# Dense (no sparsity) bf16/fp16 tensor-core peaks, FLOP/s.
CUDA_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10": 125e12,
    "L4": 121e12,
    "L40": 181e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


@functools.cache
def peak_flops(device_type: str, dtype: torch.dtype, device_name: str = "") -> float:
    """Peak FLOP/s for matmuls in `dtype` on this device (cached per process)."""
    if device_type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        for key, flops in CUDA_PEAK_BF16.items():
            if key in device_name:
                return flops
    measured = measure_matmul_flops(torch.device(device_type), dtype)
    key = f"{device_type}|{device_name or machine_name()}|{dtype}|{torch.get_num_threads()}"
    return remember_best_peak(key, measured)


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 3
) -> float:
    """FLOP/s of a size x size x size matmul in `dtype`, best of `repeats` after one warm-up."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def machine_name() -> str:
    """The CPU's model name (Linux), else the platform's machine string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine if hasattr(os, "uname") else "unknown"


def peak_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mllm" / "peak_flops.json"


def remember_best_peak(key: str, measured: float) -> float:
    """max(measured, the best remembered for `key`), remembering it; the cache is best-effort
    (an unwritable or corrupt cache file only means no memory across runs)."""
    path = peak_cache_path()
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    best = known.get(key)
    if isinstance(best, int | float) and best >= measured:
        return float(best)
    known[key] = measured
    with contextlib.suppress(Exception):  # e.g. a read-only home: MFU works, without memory
        atomic_write_json(path, known)
    return measured


def device_name(device: torch.device) -> str:
    """The GPU's name (it picks the peak FLOP/s from a table), else ""."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""
