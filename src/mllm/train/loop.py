"""`mllm train`: the training loop, on one device or on many through torchrun (DDP).

Read top to bottom:

  train()         devices and the process group, then decide (train/plan.py: the resolved
                  config and every refusal, before any work), build, loop, tear down
  build_run()     data, model, optimizer, and (on --resume) everything a checkpoint restores
  run_loop()      the steps (train/step.py); at log / eval / checkpoint boundaries: fetch the
                  losses (train/tracker.py: one device sync per boundary, not per step), log,
                  validate, save, and stop cleanly on SIGINT / SIGTERM (train/signals.py)

Every rank draws the same global batch from one seeded stream and trains on its slice, and the
logged loss is the mean over ranks, so a run's numbers do not depend on how many processes share
it. Rank 0 alone prints and writes files.
"""

from __future__ import annotations

import gc
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mllm.config import TrainConfig
from mllm.console import err_console, info, set_quiet, warn
from mllm.data.loader import TokenWindows
from mllm.device import DTYPE_NAMES, pick_device, resolve_train_dtype, synchronize
from mllm.distributed import (
    DistributedInfo,
    comm_device,
    distributed_from_env,
    gather_objects,
    init_distributed,
    leave_together,
    on_rank0,
    shutdown_distributed,
)
from mllm.errors import MllmError
from mllm.model import GPT
from mllm.scoring import sum_nll
from mllm.train import budget, memory, sharding
from mllm.train import checkpoint as ckpt
from mllm.train.flops import device_name, peak_flops
from mllm.train.metrics import MetricsLog, TrainDisplay, plot_losses
from mllm.train.optim import (
    Optimizer,
    build_optimizer,
    load_optimizer_state,
    set_learning_rates,
)
from mllm.train.plan import RunPlan, decide_run, load_resume_file
from mllm.train.resume import (
    WindowStream,
    capture_rng_state,
    rank_micro_starts,
    restore_rng_state,
)
from mllm.train.schedule import lr_at, lr_factor, wsd_decay_start
from mllm.train.signals import StopOnSignal
from mllm.train.step import prepare_model, to_device, train_step
from mllm.train.tracker import Boundary, NonFiniteLoss, StepStats, StepTracker
from mllm.train.trackers import start_trackers


@dataclass(frozen=True)
class TrainResult:
    """How a run ended: exit_code 0 when it reached its last step; 128 + the signal number (130
    for SIGINT, 143 for SIGTERM) when a signal stopped it after saving a checkpoint."""

    step: int
    checkpoint: Path | None
    exit_code: int = 0


def train(config: TrainConfig) -> TrainResult:
    """Train (or, with --resume, continue training) the GPT described by `config`."""
    dist_info = distributed_from_env()
    if not dist_info.is_main:
        set_quiet(True)  # rank 0 alone prints
    device = pick_device(config.device, dist_info.local_rank)
    if dist_info.enabled and device.type == "mps":
        raise MllmError("torchrun with MPS is not supported (no MPS collectives): run one process")
    init_distributed(device, dist_info)
    try:
        return train_in_group(config, device, dist_info)
    finally:
        # The run's DDP / FSDP wrappers hold the process group: they are freed (on return from
        # train_in_group, and by this collection) before the group is destroyed. Freed after
        # it, a gloo group's destructor once hung a 2-process run at exit (ProcessGroupGloo
        # waiting on its own lock from the DDP Reducer's destructor). One process: no group.
        if dist_info.enabled:
            gc.collect()
        shutdown_distributed()


def train_in_group(
    config: TrainConfig, device: torch.device, dist_info: DistributedInfo
) -> TrainResult:
    """train's work once the process group (if any) is up: build the run, run it, and leave
    together with the other ranks."""
    run = build_run(decide_run(config, dist_info), device, dist_info)
    try:
        with StopOnSignal() as stop, run.display.running(run.step):
            result = run_loop(run, stop)
    finally:
        run.metrics.close()
    leave_together(dist_info)
    return result


# --- Building: data, model, optimizer, and a checkpoint's state ----------------------------------


@dataclass
class Run:
    """Everything the loop uses, built once by `build_run`."""

    plan: RunPlan
    device: torch.device
    dtype: torch.dtype
    dist: DistributedInfo
    model: GPT  # unwrapped: checkpoints and validation use it
    module: nn.Module  # what a training step calls (compiled / DDP-wrapped)
    optimizer: Optimizer
    scaler: torch.amp.GradScaler
    stream: WindowStream
    train_windows: TokenWindows
    val_windows: TokenWindows
    eval_starts: np.ndarray
    peak_flops: float  # per device, in the training precision: the denominator of MFU
    metrics: MetricsLog
    display: TrainDisplay
    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    elapsed_before: float = 0.0  # wall seconds of earlier processes of this run (resumes)
    started: float = field(default_factory=time.perf_counter)
    last_checkpoint: Path | None = None
    total_steps: int = 0  # the plan's; a --time-budget run fixes it after its first steps
    time_plan: budget.TimePlan | None = None
    step_timer: budget.StepTimer | None = None  # timing the first steps of a --time-budget run
    replan_timer: budget.StepTimer | None = None  # timing the steps up to wsd's re-plan

    @property
    def step_cap(self) -> int | None:
        """A --time-budget run's --max-steps / --max-tokens cap (None: the budget alone)."""
        return None if self.plan.total_steps == budget.UNPLANNED else self.plan.total_steps

    @property
    def decay_start(self) -> int | None:
        """wsd's decay start when a --time-budget re-plan fixed it (None: from total_steps)."""
        return self.time_plan.decay_start if self.time_plan is not None else None

    @property
    def config(self) -> TrainConfig:
        return self.plan.config

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def tokens_per_step(self) -> int:
        return self.plan.tokens_per_step

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def build_run(plan: RunPlan, device: torch.device, dist_info: DistributedInfo) -> Run:
    """Open the data, build the model and optimizer, restore the checkpoint's state on --resume,
    and write the run dir's files."""
    config, meta = plan.config, plan.meta
    context = config.model.context
    train_windows = TokenWindows(meta.bin_path(config.data_dir, "train"), meta.dtype, context)
    val_windows = TokenWindows(meta.bin_path(config.data_dir, "val"), meta.dtype, context)
    dtype = resolve_train_dtype(config.dtype, device)
    sharding.check_precision(config, dist_info.world_size, dtype)
    # Before seeding: on CPU / MPS the peak is measured with random matrices, which would
    # otherwise draw from the RNG that dropout uses (and a resumed run would draw differently).
    device_peak_flops = peak_flops(device.type, dtype, device_name(device))

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = GPT(config.model)
    if config.zero_init_residual:
        model.zero_residual_projections()
    if plan.resume_from is not None:
        load_resume_file(lambda: ckpt.load_weights(plan.resume_from, model))
    model.to(device)
    module = prepare_model(model, config, device, dist_info)  # --fsdp: shards `model` in place
    optimizer = build_optimizer(model, config, device)  # after sharding: over the shards
    global_batch_rows = config.batch_size * dist_info.world_size  # one micro-step, all ranks
    eval_starts = fixed_eval_starts(val_windows, config.eval_batches * global_batch_rows)
    if sharding.is_sharded(model):  # every rank runs as many forwards (each one gathers weights)
        eval_starts = eval_starts[: len(eval_starts) - len(eval_starts) % dist_info.world_size]
    run = Run(
        plan=plan,
        device=device,
        dtype=dtype,
        dist=dist_info,
        model=model,
        module=module,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        stream=WindowStream(
            train_windows, global_batch_rows * config.grad_accum, config.seed, config.stride
        ),
        train_windows=train_windows,
        val_windows=val_windows,
        eval_starts=eval_starts,
        metrics=MetricsLog(config.run_dir / ckpt.METRICS, enabled=dist_info.is_main),
        display=TrainDisplay(
            None if plan.needs_time_plan else plan.total_steps, enabled=dist_info.is_main
        ),
        peak_flops=device_peak_flops,
        total_steps=plan.total_steps,
        time_plan=plan.time_plan,
    )
    if plan.state is not None and plan.resume_from is not None:
        restore_checkpoint(run, plan.resume_from, plan.state)
    elif dist_info.enabled:
        torch.manual_seed(config.seed + dist_info.rank)  # weights are equal; dropout masks differ
    if plan.needs_time_plan:
        run.step_timer = budget.StepTimer(config, plan_budget(run))

    if dist_info.is_main:
        if plan.resume_from is not None:
            for later in ckpt.remove_checkpoints_after(config.run_dir, run.step):
                info(f"removed {later}: saved after {plan.resume_from.name}, where the run resumes")
        ckpt.write_run_files(config, plan.tokenizer_matches)
        resume_step = run.step if plan.resume_from is not None else None
        # --tracker: TensorBoard / wandb get every record too; run.metrics.close() closes them
        run.metrics.open(resume_step=resume_step, trackers=start_trackers(config, resume_step))
    describe_run(run)
    return run


def fixed_eval_starts(val_windows: TokenWindows, count: int) -> np.ndarray:
    """The validation windows: the first `count` non-overlapping windows of val.bin (fewer when it
    is short), i.e. --eval-batches batches of batch_size x processes. The same every validation,
    so successive val losses are comparable."""
    return val_windows.strided_starts(0, min(count, val_windows.num_windows()))


def restore_checkpoint(run: Run, checkpoint: Path, state: ckpt.RunState) -> None:
    """Put the optimizer, gradient scaler, data position, RNGs and counters back as they were
    when `checkpoint` was saved (the weights are already loaded)."""
    trainer = load_resume_file(lambda: ckpt.read_trainer_state(checkpoint))
    saved = trainer["optimizer"]
    if sharding.is_sharded(run.model):  # this rank's shards of the whole tensors saved
        saved = sharding.shard_saved_optimizer_state(run.optimizer, saved)
    load_optimizer_state(run.optimizer, saved, run.config)
    if run.scaler.is_enabled() and trainer.get("scaler"):
        run.scaler.load_state_dict(trainer["scaler"])
    run.stream.load_state_dict(state.data_position)
    run.step = state.step
    run.tokens_seen = state.tokens_seen
    best = state.best_val_loss
    run.best_val_loss = math.inf if best is None else best
    run.elapsed_before = state.elapsed
    run.last_checkpoint = checkpoint
    rng_states = trainer["rng"]
    if len(rng_states) == run.dist.world_size:
        restore_rng_state(rng_states[run.dist.rank], run.device)
    else:  # a different number of processes: dropout masks cannot be the saved ones
        if run.dist.is_main and run.model.config.dropout > 0:
            warn(
                f"resuming {len(rng_states)} process(es)' run with {run.dist.world_size}: "
                "dropout draws will differ from an uninterrupted run"
            )
        torch.manual_seed(run.config.seed + run.step * 1000 + run.dist.rank)
    if run.dist.is_main and state.val_loss is not None and state.val_loss == best:
        ckpt.mark_best(run.run_dir, checkpoint, state.val_loss)  # a kill may have cut it short


def describe_run(run: Run) -> None:
    """The parameter count and what the run will do, on stderr."""
    cfg = run.model.config
    info(
        f"GPT: {run.model.num_parameters():,} parameters (d_model {cfg.d_model}, {cfg.layers} "
        f"layers, {cfg.heads} heads, context {cfg.context}, vocab {cfg.vocab_size})"
    )
    processes = f", {run.dist.world_size} processes" if run.dist.enabled else ""
    if sharding.is_sharded(run.model):
        processes += " (FSDP: weights, gradients and optimizer state sharded)"
    compiled = ", compiled" if run.config.compile else ""
    length = (
        f"for {run.config.time_budget:g} s (steps planned once the first are timed)"
        if run.plan.needs_time_plan
        else f"{run.total_steps:,} steps"
    )
    info(
        f"training {length} of {run.tokens_per_step:,} tokens on {run.device} "
        f"({DTYPE_NAMES[run.dtype]}{compiled}{processes}); run dir {run.run_dir}"
    )
    if run.plan.resume_from is not None:
        info(f"resuming from {run.plan.resume_from} (step {run.step:,})")
    need = memory.estimate_step_memory(run.model, run.config, run.dtype, run.dist.world_size)
    free = memory.free_memory(run.device)
    available = f"; {memory.size(free)} free on {run.device}" if free is not None else ""
    info(f"memory per process: {need.describe()}{available}")
    too_big = memory.too_big_warning(need, free, run.device, run.config, run.dist.world_size)
    if too_big is not None and run.dist.is_main:
        warn(too_big)


def next_micro_batches(run: Run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's (x, y) micro-batches of the next global batch, on the device."""
    starts = run.stream.next_starts()
    per_micro = rank_micro_starts(starts, run.config.grad_accum, run.dist.world_size, run.dist.rank)
    return [to_device(run.train_windows.gather(s), run.device) for s in per_micro]


# --- The loop ------------------------------------------------------------------------------------


def run_loop(run: Run, stop: StopOnSignal) -> TrainResult:
    """Train from run.step to run.total_steps; see the module docstring for the boundaries."""
    if run.step >= run.total_steps:
        info(
            f"{run.run_dir} is already at step {run.step:,} of {run.total_steps:,}: nothing to "
            "do (raise --max-steps to train further)"
        )
        return TrainResult(run.step, run.last_checkpoint)
    tracker = StepTracker(run.device, run.dist, check_grads=not run.scaler.is_enabled())
    tracker.start_timer()
    while run.step < run.total_steps:
        lr = lr_at(run.step, run.config, run.total_steps, run.decay_start)
        factor = lr_factor(run.step, run.config, run.total_steps, run.decay_start)
        set_learning_rates(run.optimizer, factor)
        loss, grad_norm = train_step(
            run.module,
            run.optimizer,
            run.scaler,
            next_micro_batches(run),
            run.device,
            run.dtype,
            run.config.grad_clip,
        )
        run.step += 1
        run.tokens_seen += run.tokens_per_step
        tracker.add(run.step, lr, loss, grad_norm)
        run.display.step_done(run.step)
        if run.step_timer is not None:
            time_the_step(run)
        elif run.replan_timer is not None:
            time_for_replan(run)

        boundary = Boundary.after(run.step, run.config, run.total_steps)
        # One process checks for a signal after every step; ranks agree on it at boundaries.
        if not boundary.any and not (stop.requested and not run.dist.enabled):
            continue
        try:
            stats, stop_agreed = tracker.flush(stop.requested)
        except NonFiniteLoss as e:
            raise diverged_error(run, e.stats) from None
        if boundary.log:
            log_training(run, stats[-1], tracker)
        val_loss = validate(run) if boundary.evaluate else None
        new_best = val_loss is not None and val_loss < run.best_val_loss
        if new_best:
            run.best_val_loss = val_loss  # type: ignore[assignment]
        if boundary.checkpoint or new_best or stop_agreed:
            save_checkpoint(run, val_loss, new_best)
        if stop_agreed and run.step < run.total_steps:  # at the last step the run is complete
            return stopped_by_signal(run, stop)
        tracker.start_timer()
    return TrainResult(run.step, run.last_checkpoint)


# --- --time-budget: timing the first steps, then fixing the run's length (train/budget.py) -----


def plan_budget(run: Run) -> float:
    """The budget left to this process: --time-budget less earlier processes' seconds."""
    assert run.config.time_budget is not None
    return max(1e-3, run.config.time_budget - run.elapsed_before)


def time_the_step(run: Run) -> None:
    """Record the step's end; once rank 0 has timed enough steps, every rank takes its plan."""
    assert run.step_timer is not None
    synchronize(run.device)  # the step's end, not just its launch (a few steps only)
    run.step_timer.step_done()
    if on_rank0(lambda: run.step_timer.ready(run.step), run.dist):
        make_time_plan(run)


def make_time_plan(run: Run) -> None:
    """Fix the run's length from the timed steps (rank 0 decides, every rank follows) and
    record it in metrics.jsonl; the next checkpoint's state.json holds it too."""
    assert run.step_timer is not None
    timer = run.step_timer
    eval_seconds = estimate_eval_seconds(run)  # every rank: under FSDP a forward is collective

    def decide() -> budget.TimePlan:
        return budget.plan_steps(
            run.config.model_copy(update={"time_budget": timer.budget}),
            run.step,
            budget.process_elapsed(),
            timer.seconds_per_step(),
            eval_seconds,
            estimate_checkpoint_seconds(run),
            run.step_cap,
        )

    plan = on_rank0(decide, run.dist)
    run.step_timer = None
    if run.config.schedule == "wsd":  # re-planned at this plan's decay start (budget.py)
        run.replan_timer = budget.StepTimer(run.config, timer.budget, cold_steps=0)
    take_plan(run, plan)
    run.display.note(
        f"--time-budget {run.config.time_budget:g} s: {plan.total_steps:,} steps planned at step "
        f"{run.step:,} ({plan.seconds_per_step:.3f} s per step, {budget.process_elapsed():.1f} s "
        "spent)"
    )
    if plan.total_steps <= run.config.warmup_steps:
        warn(
            f"the budget fits {plan.total_steps:,} steps, no more than --warmup-steps "
            f"{run.config.warmup_steps}: the learning rate never reaches its peak"
        )


def take_plan(run: Run, plan: budget.TimePlan) -> None:
    """Every rank follows `plan` from this step; metrics.jsonl records it (its budget: the whole
    --time-budget, not what was left to this process)."""
    run.time_plan = plan.model_copy(update={"budget": run.config.time_budget})
    run.total_steps = plan.total_steps
    run.display.set_total(plan.total_steps)
    run.metrics.write({"step": run.step, "time_plan": run.time_plan.model_dump()})


def time_for_replan(run: Run) -> None:
    """Record the step's end (no device sync: over many steps the host runs at the device's
    pace); at the plan's decay start, plan again from these steps (budget.replan_steps)."""
    assert run.replan_timer is not None and run.time_plan is not None
    timer = run.replan_timer
    timer.step_done()
    if not budget.needs_replan(run.config, run.time_plan, run.step):
        return
    first = run.time_plan

    def decide() -> budget.TimePlan:
        return budget.replan_steps(
            run.config.model_copy(update={"time_budget": timer.budget}),
            first,
            run.step,
            budget.process_elapsed(),
            timer.seconds_per_step(),
            run.step_cap,
        )

    plan = on_rank0(decide, run.dist)
    run.replan_timer = None
    take_plan(run, plan)
    starts = plan.decay_start or wsd_decay_start(run.config, plan.total_steps)
    decay = "its decay starts now" if starts == run.step else f"its decay starts at step {starts:,}"
    run.display.note(
        f"--time-budget {run.config.time_budget:g} s: re-planned at step {run.step:,}, the first "
        f"plan's decay start: {plan.total_steps:,} steps instead of {first.total_steps:,} "
        f"({plan.seconds_per_step:.3f} s per step since step {first.planned_at_step:,}; {decay})"
    )


def estimate_eval_seconds(run: Run) -> float:
    """One validation's time: one validation batch timed now (the faster of two runs: the first
    pays one-off warm-up), times the batches of this rank's validation windows."""
    starts = run.eval_starts[run.dist.rank :: run.dist.world_size]
    batch_size = run.config.batch_size
    timings = []
    for _ in range(2):
        began = budget.now()
        sum_nll(run.model, run.val_windows, starts[:batch_size], batch_size, run.device, run.dtype)
        synchronize(run.device)
        timings.append(budget.now() - began)
    return min(timings) * -(-len(starts) // batch_size)


def estimate_checkpoint_seconds(run: Run) -> float:
    """One checkpoint's time: the weights and up to two optimizer moments at a slow disk's
    200 MB/s, plus half a second of fixed cost (the estimate errs long, not short)."""
    size = sum(p.numel() * p.element_size() for p in run.model.parameters()) * 3
    return 0.5 + size / 200e6


def log_training(run: Run, stats: StepStats, tracker: StepTracker) -> None:
    """A metrics.jsonl record for the step just done, and the same on screen."""
    steps, seconds, cold = tracker.take_interval()
    tokens_per_s = steps * run.tokens_per_step / seconds if seconds > 0 else 0.0
    record = {
        "step": stats.step,
        "loss": stats.loss,
        "lr": stats.lr,
        "tokens": run.tokens_seen,
        "tokens_per_s": tokens_per_s,
        "mfu": model_flops_utilisation(run, tokens_per_s),
        "grad_norm": stats.grad_norm,
        "elapsed": run.elapsed,
        "cold": cold,
    }
    run.metrics.write(record)
    planned = steps and run.step_timer is None  # a --time-budget run's length is not yet known
    eta = (run.total_steps - run.step) * seconds / steps if planned else math.inf
    run.display.show(record, eta)


def model_flops_utilisation(run: Run, tokens_per_s: float) -> float:
    """Model FLOPs per second achieved over the peak of all devices of the run."""
    peak = run.peak_flops * run.dist.world_size
    return run.model.flops_per_token() * tokens_per_s / peak if peak > 0 else 0.0


def validate(run: Run) -> float:
    """Mean validation loss over the fixed validation windows (split across ranks), recorded in
    metrics.jsonl and drawn in loss.png."""
    starts = run.eval_starts[run.dist.rank :: run.dist.world_size]
    nats, count = sum_nll(
        run.model, run.val_windows, starts, run.config.batch_size, run.device, run.dtype
    )
    if run.dist.enabled:
        totals = torch.tensor([nats, count], dtype=torch.float64, device=comm_device(run.device))
        dist.all_reduce(totals)
        nats, count = totals.tolist()
    val_loss = nats / count
    if run.dist.is_main:
        run.metrics.write(
            {
                "step": run.step,
                "val_loss": val_loss,
                "tokens": run.tokens_seen,
                "elapsed": run.elapsed,
            }
        )
        plot_losses(run.run_dir / ckpt.LOSS_PLOT, run.metrics.records)
        run.display.note(f"step {run.step:,}: val loss {val_loss:.4f}")
    return val_loss


def save_checkpoint(run: Run, val_loss: float | None, new_best: bool) -> None:
    """checkpoints/step_N (atomic), best.json when it is the best so far, then retention.

    Every rank calls this (their RNG states are gathered, and under FSDP the weights and
    optimizer state); rank 0 writes.
    """
    rng_states = gather_objects(capture_rng_state(run.device), run.dist)
    main, sharded = run.dist.is_main, sharding.is_sharded(run.model)
    if sharded:  # every rank gathers (collectives); rank 0 alone keeps the copies
        weights = sharding.full_weights(run.model, keep=main)
        optimizer_state = sharding.full_optimizer_state(run.optimizer, keep=main)
    if not main:
        return
    if not sharded:
        weights, optimizer_state = run.model, run.optimizer.state_dict()
    state = ckpt.RunState(
        step=run.step,
        tokens_seen=run.tokens_seen,
        total_steps=run.total_steps,
        elapsed=run.elapsed,
        val_loss=val_loss,
        best_val_loss=None if math.isinf(run.best_val_loss) else run.best_val_loss,
        world_size=run.dist.world_size,
        dtype=DTYPE_NAMES[run.dtype],
        data_position=run.stream.state_dict(),
        train_config=run.config.model_copy(update={"resume": False, "resume_from": None}),
        data=ckpt.DataIdentity.of(run.plan.meta),
        time_plan=run.time_plan,
    )
    trainer_state = ckpt.trainer_state(optimizer_state, run.scaler, rng_states)
    path = ckpt.write_checkpoint(run.run_dir, weights, state, trainer_state)
    if new_best and val_loss is not None:
        ckpt.mark_best(run.run_dir, path, val_loss)
    ckpt.prune_checkpoints(run.run_dir, run.config.keep_last)
    run.last_checkpoint = path
    run.display.note(f"step {run.step:,}: saved {path}")


def diverged_error(run: Run, stats: StepStats) -> MllmError:
    """The one-line error for a NaN / inf loss: nothing is saved after it."""
    what = f"loss {stats.loss}" if not math.isfinite(stats.loss) else f"grad norm {stats.grad_norm}"
    kept = (
        f"the last good checkpoint is {run.last_checkpoint} (continue from it with --resume)"
        if run.last_checkpoint is not None
        else "no checkpoint was saved before it"
    )
    return MllmError(
        f"training diverged: {what} at step {stats.step} (lr {stats.lr:.3g}); stopped without "
        f"saving, {kept}; try a lower --lr or a longer --warmup-steps"
    )


def stopped_by_signal(run: Run, stop: StopOnSignal) -> TrainResult:
    signum = stop.signum or signal.SIGTERM  # another rank's signal stopped this one
    if run.dist.is_main:
        err_console.print(  # even with --quiet: it says why the run ended and how to go on
            f"stopped by {signal.Signals(signum).name} at step {run.step:,}: saved "
            f"{run.last_checkpoint}; continue with `mllm train --resume --run-dir {run.run_dir}`",
            markup=False,
            soft_wrap=True,
        )
    return TrainResult(run.step, run.last_checkpoint, exit_code=128 + signum)
