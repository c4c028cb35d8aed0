"""Distributed training: where this process sits in a torchrun job, the process group, and the
few collective steps the loop needs (a decision taken on rank 0, a gather, a barrier).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL joins the ranks on CUDA, gloo elsewhere.
Nothing here is home-made communication: every collective is torch.distributed's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mllm.errors import MllmError

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def distributed_from_env() -> DistributedInfo:
    """Read torchrun's environment variables (absent: a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return DistributedInfo(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world_size,
    )


def init_distributed(device: torch.device, info: DistributedInfo) -> None:
    """Join the process group torchrun set up: NCCL on CUDA, gloo otherwise."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def on_rank0(decide: Callable[[], T], info: DistributedInfo) -> T:
    """Run `decide` on rank 0 and give every rank its result (or its error), so all ranks take
    the same path even when they do not share a filesystem."""
    if not info.enabled:
        return decide()
    box: list[Any] = [None]
    failure: Exception | None = None
    if info.is_main:
        try:
            box[0] = ("ok", decide())
        except Exception as e:  # any error: the other ranks wait at the broadcast below
            failure = e
            shared = e if isinstance(e, MllmError) else MllmError(f"rank 0: {e!r}")
            box[0] = ("error", shared)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if failure is not None:
        raise failure
    if kind == "error":
        raise value
    return value


def gather_objects(obj: T, info: DistributedInfo) -> list[T]:
    """`obj` from every rank, in rank order."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def leave_together(info: DistributedInfo) -> None:
    """A barrier before tearing the group down: rank 0 is still writing the last checkpoint when
    the others are done, and gloo aborts a process (SIGABRT, "terminate called without an active
    exception") whose peer tears the group down under it."""
    if info.enabled:
        dist.barrier()


def comm_device(device: torch.device) -> torch.device:
    """Where collective tensors live: the GPU with NCCL, the CPU with gloo."""
    return device if device.type == "cuda" else torch.device("cpu")
