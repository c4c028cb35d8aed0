"""--time-budget: how many steps fit in a wall-clock budget, decided early in the run (and, with
wsd, once more at its decay start).

The whole command counts, from process start (imports, data, compilation) to exit (the final
evaluation and checkpoint included). The run trains its first steps while it measures them:
their learning rate does not depend on the run's length (the warmup, and wsd's constant phase),
so those steps are not wasted. Once enough steady steps are timed (the first few, which compile
and warm caches, are left out), `plan_steps` fixes the total so that the remaining steps plus the
evaluations and checkpoints they imply end inside the budget, and from then on the run is an
ordinary run of that many steps: the schedule decays to --min-lr exactly at its last step.

With --schedule wsd the run re-plans once, when it reaches the decay of its first plan
(`replan_steps`): a plan made from the first ~20 steps is off by however much the machine's speed
drifts later (shared cores, thermal limits, a first plan timed while other work ran), and until
the decay no learning rate depends on the length. The re-plan times the steps since the first
plan; if more steps fit, the constant phase goes on to the new plan's decay start; if fewer, the
decay starts now (`decay_start`), shorter. No step's learning rate changes after it is used.

The plan is written to metrics.jsonl and state.json; a resumed run takes the saved plan (it does
not measure again, nor re-plan), so resume stays exact.
"""

from __future__ import annotations

import itertools
import os
import time

from pydantic import BaseModel, ConfigDict, Field

from mllm.config import TrainConfig
from mllm.train.schedule import wsd_decay_start

COLD_STEPS = 5  # steps left out of the timing: compilation, allocator and cache warm-up
MIN_TIMED_STEPS = 5
ENOUGH_TIMED_STEPS = 20
ENOUGH_TIMED_FRACTION = 0.08  # ... or this fraction of the budget timed, whichever comes first
EXIT_SECONDS = 2.0  # after the last checkpoint: the loss plot, trackers, interpreter exit
EXIT_FRACTION = 0.01  # plus this fraction of the budget, for the estimate's noise
UNPLANNED = 10**12  # the run's length before the plan (no boundary is "the last step")

_IMPORTED_AT = time.monotonic()


def now() -> float:
    """The budget's clock (monotonic seconds). Tests replace it with a fake one."""
    return time.monotonic()


def process_elapsed() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere: since mllm's training
    code was imported, which misses the interpreter's own start-up of a second or so)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 of stat(5), counted after the "(comm)"
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        elapsed = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
        if elapsed >= 0:
            return elapsed
    except (OSError, ValueError, IndexError):
        pass
    return now() - _IMPORTED_AT


class TimePlan(BaseModel):
    """How a --time-budget run decided its length (saved in metrics.jsonl and state.json)."""

    model_config = ConfigDict(extra="forbid")

    budget: float = Field(gt=0, description="--time-budget, seconds.")
    planned_at_step: int = Field(ge=0, description="Steps done when the plan was made.")
    elapsed_at_plan: float = Field(ge=0, description="Seconds of the run when it was made.")
    seconds_per_step: float = Field(ge=0, description="Measured, warm steps only.")
    seconds_per_eval: float = Field(ge=0, description="Estimated time of one validation.")
    seconds_per_checkpoint: float = Field(ge=0, description="Estimated time of one checkpoint.")
    total_steps: int = Field(ge=1, description="The run's planned length.")
    decay_start: int | None = Field(
        None,
        description="wsd: the decay's first step, when a re-plan that fitted fewer steps started "
        "it early (None: the last --decay-fraction of total_steps).",
    )
    replanned: bool = Field(False, description="Made again at the first plan's decay start.")


class StepTimer:
    """Times the steps of the run's first process until there is enough to plan on."""

    def __init__(self, config: TrainConfig, budget: float, cold_steps: int = COLD_STEPS) -> None:
        self.config = config
        self.budget = budget  # what is left of --time-budget to this process
        self.cold_steps = cold_steps  # left out of the timing
        self.step_ends: list[float] = []  # clock after each step of this process

    def step_done(self) -> None:
        self.step_ends.append(now())

    def seconds_per_step(self) -> float:
        """The median warm step (the first COLD_STEPS left out when there are enough)."""
        ends = self.step_ends
        steady = ends[self.cold_steps :] if len(ends) > self.cold_steps + 1 else ends
        gaps = sorted(b - a for a, b in itertools.pairwise(steady))
        if not gaps:  # a single step: all we know is how long the process took to do it
            return process_elapsed() / max(1, len(ends))
        return gaps[len(gaps) // 2]

    def ready(self, step: int) -> bool:
        """Enough timed to plan, or the last step at which the plan can still be made."""
        timed = len(self.step_ends) - COLD_STEPS - 1
        if self.config.schedule == "cosine" and step >= self.config.warmup_steps:
            return True  # the cosine's shape depends on the length from here on
        if timed < MIN_TIMED_STEPS:
            return False
        steady_seconds = self.step_ends[-1] - self.step_ends[COLD_STEPS]
        return timed >= ENOUGH_TIMED_STEPS or steady_seconds >= ENOUGH_TIMED_FRACTION * self.budget


def needs_replan(config: TrainConfig, plan: TimePlan, step: int) -> bool:
    """A wsd run made its first plan in this process and has just reached that plan's decay."""
    if config.schedule != "wsd" or plan.replanned or step >= plan.total_steps - 1:
        return False
    return step == wsd_decay_start(config, plan.total_steps)


def replan_steps(
    config: TrainConfig,
    plan: TimePlan,
    step: int,
    run_elapsed: float,
    seconds_per_step: float,
    cap: int | None,
) -> TimePlan:
    """The plan made again at the first plan's decay start (`step`), from the steps timed since
    (evaluations and checkpoints keep their first estimates). More steps: the constant phase
    goes on until the new plan's decay start. Fewer: the decay starts at `step`, shorter than
    --decay-fraction, so the learning rate falls from the peak without a jump."""
    new = plan_steps(
        config, step, run_elapsed, seconds_per_step, plan.seconds_per_eval,
        plan.seconds_per_checkpoint, cap,
    )  # fmt: skip
    early = wsd_decay_start(config, new.total_steps) < step
    return new.model_copy(update={"decay_start": step if early else None, "replanned": True})


def plan_steps(
    config: TrainConfig,
    step: int,
    run_elapsed: float,
    seconds_per_step: float,
    seconds_per_eval: float,
    seconds_per_checkpoint: float,
    cap: int | None,
) -> TimePlan:
    """The most steps whose training, evaluations and checkpoints end inside the budget (at
    least one more than `step`, and at most `cap`). `run_elapsed` is the budget spent so far."""
    budget = config.time_budget
    assert budget is not None
    left = budget - run_elapsed - EXIT_SECONDS - EXIT_FRACTION * budget

    def cost(total: int) -> float:
        steps = total - step
        evals = total // config.eval_interval - step // config.eval_interval + 1  # + the final
        checkpoints = total // config.ckpt_interval - step // config.ckpt_interval + 1
        checkpoints += evals  # each evaluation can be a new best, which saves one
        return (
            steps * seconds_per_step
            + evals * seconds_per_eval
            + checkpoints * seconds_per_checkpoint
        )

    total = step + max(1, int(left / max(seconds_per_step, 1e-9)))
    while total > step + 1 and cost(total) > left:
        over = cost(total) - left
        total -= max(1, int(over / max(seconds_per_step, 1e-9)))
    total = max(total, step + 1)
    if cap is not None:
        total = min(total, cap)
    return TimePlan(
        budget=budget,
        planned_at_step=step,
        elapsed_at_plan=run_elapsed,
        seconds_per_step=seconds_per_step,
        seconds_per_eval=seconds_per_eval,
        seconds_per_checkpoint=seconds_per_checkpoint,
        total_steps=total,
    )
