"""Device and precision choices, in one place (the process group is distributed.py's).

`--device auto` picks cuda > mps > cpu. Precision `auto` for training picks bf16 autocast where the
hardware runs it fast (CUDA Ampere or newer, CPUs with AMX or AVX512-BF16), fp16 with a gradient
scaler on older CUDA, fp32 otherwise. Decoding has its own policy (`resolve_decode_dtype`), set
from benchmarks/bench_generate.py: batch-1 decoding is bound by streaming the weights.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mllm.errors import MllmError, UsageError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {value: key for key, value in DTYPES.items()}


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch device for `name` (auto|cuda|mps|cpu); a requested device that is missing is an
    error, not a silent fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise MllmError("--device cuda: no CUDA device is available (use --device cpu)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" and not torch.backends.mps.is_available():
        raise MllmError("--device mps: MPS is not available on this machine (use --device cpu)")
    return torch.device(name)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AMX or AVX512-BF16): then bf16 autocast is
    several times faster than fp32 (about 9x with AMX, 2.5x with AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:  # not Linux: trust oneDNN's own check
        checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(checker and checker())
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_train_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype training uses for `--dtype name` on `device`."""
    if name != "auto":
        dtype = DTYPES[name]
        if dtype == torch.float16 and device.type == "cpu":
            raise UsageError("--dtype fp16 is not supported for training on CPU (use bf16 or fp32)")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if device.type == "mps":
        return torch.bfloat16 if _mps_supports_bf16() else torch.float16
    return torch.float32


def resolve_decode_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype decoding (generate, serve) runs in for `--dtype name` on `device`.

    auto on CPU: bf16 where the CPU runs it natively (AMX / AVX512-BF16), else fp32. Batch-1
    decoding streams every weight once per token, so it is bound by memory traffic, which bf16
    halves: with oneDNN-packed bf16 weights (generate.Decoder) benchmarks/bench_generate.py
    measured 1.3-1.9x (bench size) and 1.5-2.5x (220M) the fp32 speed, with 1-2 threads, on an
    AVX512-BF16 EPYC (README, `mllm generate`). On accelerators: the training choice.
    """
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return resolve_train_dtype("auto", device)


def resolve_eval_dtype(name: str, device: torch.device) -> torch.dtype:
    """Evaluation runs full windows like training: the training policy applies."""
    return resolve_train_dtype(name, device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing must not stop the clock early)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass(frozen=True)
class ThreadChoice:
    """How many CPU threads decoding uses, and why (generate and serve print it at start-up)."""

    count: int
    reason: str

    def __str__(self) -> str:
        return f"{self.count} thread{'s' * (self.count != 1)} ({self.reason})"


def usable_cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def busy_cpus_now(cpus: list[int], sample_s: float = 0.05) -> float | None:
    """How many of `cpus` other processes keep busy right now: their non-idle time over a short
    sample of /proc/stat (this process sleeps meanwhile); None where there is no /proc/stat."""

    def read() -> dict[int, tuple[int, int]]:
        times = {}
        with open("/proc/stat", encoding="ascii") as stat:
            for line in stat:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    values = [int(v) for v in fields]
                    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
                    times[int(name[3:])] = (sum(values), idle)
        return times

    try:
        before = read()
        time.sleep(sample_s)
        after = read()
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for cpu in cpus:
        if cpu in before and cpu in after:
            total = after[cpu][0] - before[cpu][0]
            idle = after[cpu][1] - before[cpu][1]
            busy += (total - idle) / total if total > 0 else 0.0
    return busy


def decode_threads(requested: int | None = None, reserved: int = 0) -> ThreadChoice:
    """CPU threads for decoding: `requested`, else the cores this process may use that other
    processes leave idle right now (a 50 ms look at /proc/stat; every core where the OS does not
    say), less `reserved` (serve keeps one for its event loop); at least 1.

    Each matrix-vector product of a decode step is split across the threads and waits for the
    slowest, so a thread sharing its core with another busy process stalls every product.
    Measured on a 2-core machine with one other busy process: 1 thread decoded the bench model
    at ~250 tokens/s, 2 threads at 10-60; on the idle machine 2 threads reached ~400
    (benchmarks/bench_generate.py). The 1-minute load average, used before, still counts work that
    ended seconds ago: right after a benchmark it chose 1 thread on an idle 2-core machine (278
    tokens/s against 351 with 2).
    """
    if requested is not None:
        return ThreadChoice(requested, "--threads")
    cpus = usable_cpus()
    busy = busy_cpus_now(cpus)
    kept = f", {reserved} kept for HTTP" if reserved else ""
    if busy is None:
        return ThreadChoice(max(1, len(cpus) - reserved), f"every core{kept}")
    idle = max(0, min(len(cpus), round(len(cpus) - busy)))
    count = max(1, idle - reserved)
    return ThreadChoice(count, f"{idle} of {len(cpus)} cores idle now{kept}")


def _mps_supports_bf16() -> bool:
    try:
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision for the forward pass: autocast to `dtype`, a no-op for fp32.

    On CPU this must be explicit: bf16 matmuls only reach AMX / AVX512-BF16 under autocast.
    """
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
