"""The loop's view of its steps: which boundaries follow a step (log, validate, checkpoint), and
the steps' numbers: losses and gradient norms kept on the device until a log /
eval / checkpoint boundary (one device sync per boundary, not per step), averaged over ranks
there, checked for divergence, and the steps' time measured between boundaries."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mllm.config import TrainConfig
from mllm.device import synchronize
from mllm.distributed import DistributedInfo, comm_device


@dataclass(frozen=True)
class StepStats:
    """One step's numbers, fetched from the device at a boundary (mean over ranks)."""

    step: int
    lr: float
    loss: float
    grad_norm: float


class NonFiniteLoss(Exception):
    def __init__(self, stats: StepStats) -> None:
        super().__init__(f"step {stats.step}")
        self.stats = stats


class StepTracker:
    """Keeps each step's loss and gradient norm on the device until the next boundary, so the
    device is synchronised once per boundary rather than once per step, and times the steps
    (device-synchronised; time spent at boundaries is not counted)."""

    def __init__(self, device: torch.device, dist_info: DistributedInfo, check_grads: bool) -> None:
        self.device = device
        self.comm_device = comm_device(device)
        self.dist = dist_info
        self.check_grads = check_grads  # fp16 with a scaler skips overflowing steps itself
        self.pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []
        self.interval_seconds = 0.0
        self.interval_steps = 0
        self.cold = True  # the next interval holds this process's first step
        self._started = 0.0

    def start_timer(self) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, lr, loss, grad_norm))

    def flush(self, stop_requested: bool) -> tuple[list[StepStats], bool]:
        """The pending steps' stats (averaged over ranks) and whether any rank asked to stop;
        raises NonFiniteLoss at the first step whose loss (or, without a gradient scaler,
        gradient norm) is not finite."""
        synchronize(self.device)
        self.interval_seconds += time.perf_counter() - self._started
        self.interval_steps += len(self.pending)
        values = torch.stack(
            [torch.stack([loss, norm.float()]) for _, _, loss, norm in self.pending]
        )
        stop = torch.tensor([float(stop_requested)], device=values.device)
        flat = torch.cat([values.flatten(), stop]).to(self.comm_device)
        if self.dist.enabled:
            dist.all_reduce(flat)
            flat[:-1] /= self.dist.world_size
        host = flat.tolist()
        stats = [
            StepStats(step, lr, host[2 * i], host[2 * i + 1])
            for i, (step, lr, _, _) in enumerate(self.pending)
        ]
        self.pending.clear()
        for stat in stats:
            grads_bad = self.check_grads and not math.isfinite(stat.grad_norm)
            if not math.isfinite(stat.loss) or grads_bad:
                raise NonFiniteLoss(stat)
        return stats, host[-1] > 0

    def take_interval(self) -> tuple[int, float, bool]:
        """(steps, seconds, cold) since the last call: the throughput of one log interval."""
        result = (self.interval_steps, self.interval_seconds, self.cold)
        self.interval_steps, self.interval_seconds, self.cold = 0, 0.0, False
        return result


@dataclass(frozen=True)
class Boundary:
    """What happens after a step: a log record, an evaluation, a checkpoint."""

    log: bool
    evaluate: bool
    checkpoint: bool

    @classmethod
    def after(cls, step: int, config: TrainConfig, total_steps: int) -> Boundary:
        last = step == total_steps
        return cls(
            log=step % config.log_interval == 0 or last,
            evaluate=step % config.eval_interval == 0 or last,
            checkpoint=step % config.ckpt_interval == 0 or last,
        )

    @property
    def any(self) -> bool:
        return self.log or self.evaluate or self.checkpoint
