"""Peak matmul throughput of a device, the denominator of MFU (model FLOPs utilisation).

On CUDA the dense peak comes from a table of known GPUs; elsewhere (CPU, MPS, unknown GPUs) it is
measured once with a large matmul in the precision in use, as PERF.md did.
"""

from __future__ import annotations

import functools
import time

import torch

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
    return measure_matmul_flops(torch.device(device_type), dtype)


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 3
) -> float:
    """FLOP/s of a size x size x size matmul in `dtype`, best of `repeats` after one warm-up."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
