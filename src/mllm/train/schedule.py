"""The learning-rate schedules: cosine (nanoGPT's) and warmup-stable-decay.

A schedule is a pure function of the step and the run's total steps, so a resumed run follows
exactly the schedule an uninterrupted run would have. It gives a factor of the peak: every
parameter group (AdamW's at --lr, Muon's at --muon-lr) follows the same shape, from 0 up to 1
over the warmup and down to --min-lr / --lr at the last step.
"""

from __future__ import annotations

import math

from mllm.config import TrainConfig


def lr_factor(
    step: int, config: TrainConfig, total_steps: int, decay_start: int | None = None
) -> float:
    """The fraction of the peak learning rate for optimizer step `step` (0-based). `decay_start`:
    wsd's first decay step when a --time-budget re-plan fixed it (train/budget.py)."""
    floor = config.min_lr / config.lr
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if step >= total_steps - 1 and total_steps > config.warmup_steps:
        return floor  # the last step is always at the floor: the schedule ends on time
    if config.schedule == "wsd":
        if decay_start is None:
            decay_start = wsd_decay_start(config, total_steps)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / max(1, total_steps - decay_start)
        return 1.0 - progress * (1.0 - floor)
    decay_steps = max(1, total_steps - 1 - config.warmup_steps)
    progress = (step - config.warmup_steps) / decay_steps
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)


def wsd_decay_start(config: TrainConfig, total_steps: int) -> int:
    """The first step of warmup-stable-decay's decay: the last --decay-fraction of the run,
    never inside the warmup."""
    decay_steps = max(1, round(config.decay_fraction * total_steps))
    return max(config.warmup_steps, total_steps - decay_steps)


def lr_at(
    step: int, config: TrainConfig, total_steps: int, decay_start: int | None = None
) -> float:
    """The AdamW groups' learning rate (--lr's schedule) at `step`: what metrics.jsonl logs."""
    return config.lr * lr_factor(step, config, total_steps, decay_start)
