"""`mllm train`: the training loop, on one device or on many through torchrun (DDP).

Read top to bottom:

  train()          devices and the process group, then set-up, the loop, tear-down
  set_up_run()     data, model, optimizer and (on --resume) everything a checkpoint restores
  prepare_model()  the module a step calls: the loss, torch.compile'd, wrapped in DDP
  train_step()     forward + backward over the micro-batches, clip, optimizer update
  run_loop()       the steps; at log / eval / checkpoint boundaries: fetch the losses (one device
                   sync per boundary, not per step), check they are finite, log, evaluate, save,
                   and stop cleanly on SIGINT / SIGTERM

Every rank draws the same global batch from one seeded stream and trains on its slice, and the
logged loss is the mean over ranks, so a run's numbers do not depend on how many processes share
it. Rank 0 alone prints and writes files.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mllm import __version__
from mllm.config import ModelConfig, TrainConfig
from mllm.console import err_console, info, set_quiet, warn
from mllm.data.loader import TokenWindows
from mllm.data.meta import DATA_JSON, DataMeta, check_bins, load_data_meta
from mllm.device import (
    DTYPE_NAMES,
    DistributedInfo,
    autocast,
    distributed_from_env,
    init_distributed,
    pick_device,
    resolve_train_dtype,
    shutdown_distributed,
    synchronize,
)
from mllm.errors import MllmError, UsageError
from mllm.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from mllm.model import GPT
from mllm.scoring import sum_nll
from mllm.train import checkpoint as ckpt
from mllm.train.cpu_memory import retain_freed_memory
from mllm.train.flops import peak_flops
from mllm.train.metrics import MetricsLog, TrainDisplay, plot_losses
from mllm.train.optim import build_optimizer, lr_at, set_hyperparameters
from mllm.train.resume import (
    WindowStream,
    capture_rng_state,
    check_same_data,
    check_same_model,
    checkpoint_to_resume,
    data_identity,
    merge_resume_config,
    rank_micro_starts,
    restore_rng_state,
)

DEFAULT_MAX_STEPS = 5000

T = TypeVar("T")


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
        run = set_up_run(config, device, dist_info)
        try:
            with StopOnSignal() as stop, run.display.running(run.step):
                result = run_loop(run, stop)
        finally:
            run.metrics.close()
        if dist_info.enabled:
            # Leave together: rank 0 is still writing the last checkpoint when the others are
            # done, and gloo aborts a process (SIGABRT, "terminate called without an active
            # exception") whose peer tears the group down under it.
            dist.barrier()
        return result
    finally:
        shutdown_distributed()


# --- Set-up --------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop uses, built once by `set_up_run`."""

    config: TrainConfig
    meta: DataMeta
    device: torch.device
    dtype: torch.dtype
    dist: DistributedInfo
    model: GPT  # unwrapped: checkpoints and evaluation use it
    module: nn.Module  # what a training step calls (compiled / DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    stream: WindowStream
    train_windows: TokenWindows
    val_windows: TokenWindows
    eval_starts: np.ndarray
    total_steps: int
    tokens_per_step: int
    peak_flops: float  # per device, in the training precision: the denominator of MFU
    metrics: MetricsLog
    display: TrainDisplay
    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    elapsed_before: float = 0.0  # wall seconds of earlier processes of this run (resumes)
    started: float = field(default_factory=time.perf_counter)
    last_checkpoint: Path | None = None

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live: the GPU with NCCL, the CPU with gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def set_up_run(config: TrainConfig, device: torch.device, dist_info: DistributedInfo) -> Run:
    """Resolve the config, open the data, build model and optimizer, and restore a checkpoint's
    state on --resume; refuse anything that does not fit together before any work starts."""
    resume_from = on_rank0(lambda: checkpoint_to_resume(config.run_dir, config.resume), dist_info)
    state = ckpt.read_state(resume_from) if resume_from is not None else None
    if state is not None:
        config = merge_resume_config(config, state["train_config"])

    meta = load_data_meta(config.data_dir)
    check_bins(config.data_dir, meta)
    tokenizer_matches = tokenizer_packed_the_bins(config.data_dir, meta)
    if state is None and tokenizer_matches is False:
        raise MllmError(
            f"{config.data_dir / 'tokenizer.json'} is not the tokenizer the bins in "
            f"{config.data_dir} were packed with (did `mllm tokenize` run after `mllm pack`?): "
            f"re-run `mllm pack --data-dir {config.data_dir}`"
        )
    model_config = resolve_model_config(config.model, meta)
    if state is not None and resume_from is not None:
        check_same_model(model_config, state, resume_from)
        check_same_data(meta, config.data_dir, state, resume_from)
    config = config.model_copy(update={"model": model_config})
    train_windows = open_windows(config.data_dir, meta, "train", model_config.context)
    val_windows = open_windows(config.data_dir, meta, "val", model_config.context)
    dtype = resolve_train_dtype(config.dtype, device)
    # Before seeding: on CPU / MPS the peak is measured with random matrices, which would
    # otherwise draw from the RNG that dropout uses (and a resumed run would draw differently).
    device_peak_flops = peak_flops(device.type, dtype, device_name(device))

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = GPT(model_config)
    if resume_from is not None:
        ckpt.load_weights(resume_from, model)
    model.to(device)
    optimizer = build_optimizer(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    global_batch_rows = config.batch_size * dist_info.world_size  # one micro-step, all ranks
    global_batch = global_batch_rows * config.grad_accum
    stream = WindowStream(train_windows, global_batch, config.seed, config.stride)
    tokens_per_step = global_batch * model_config.context
    total_steps = total_steps_for(config, tokens_per_step)
    if config.warmup_steps > total_steps and dist_info.is_main:  # warmup reaches lr at its end
        warn(
            f"--warmup-steps {config.warmup_steps} is more than the {total_steps} steps of the "
            "run: the learning rate never reaches --lr (lower --warmup-steps)"
        )
    module = prepare_model(model, config, device, dist_info)

    run = Run(
        config=config,
        meta=meta,
        device=device,
        dtype=dtype,
        dist=dist_info,
        model=model,
        module=module,
        optimizer=optimizer,
        scaler=scaler,
        stream=stream,
        train_windows=train_windows,
        val_windows=val_windows,
        eval_starts=fixed_eval_starts(val_windows, config.eval_batches * global_batch_rows),
        total_steps=total_steps,
        tokens_per_step=tokens_per_step,
        metrics=MetricsLog(config.run_dir / ckpt.METRICS, enabled=dist_info.is_main),
        display=TrainDisplay(total_steps, enabled=dist_info.is_main),
        peak_flops=device_peak_flops,
    )
    if state is not None and resume_from is not None:
        restore_checkpoint(run, resume_from, state)
    elif dist_info.enabled:
        torch.manual_seed(config.seed + dist_info.rank)  # weights are equal; dropout masks differ

    if dist_info.is_main:
        write_run_files(config, tokenizer_matches)
        run.metrics.open(resume_step=run.step if resume_from is not None else None)
    describe_run(run, resume_from)
    return run


def on_rank0(decide: Callable[[], T], dist_info: DistributedInfo) -> T:
    """Run `decide` on rank 0 and give every rank its result (or its error), so all ranks take
    the same path even when they do not share a filesystem."""
    if not dist_info.enabled:
        return decide()
    box: list[Any] = [None]
    failure: Exception | None = None
    if dist_info.is_main:
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


def resolve_model_config(model: ModelConfig, meta: DataMeta) -> ModelConfig:
    """The model config with vocab_size filled from data.json; a smaller --vocab-size than the
    data's is refused (token ids would index past the embedding)."""
    if model.vocab_size is None:
        return model.model_copy(update={"vocab_size": meta.vocab_size})
    if model.vocab_size < meta.vocab_size:
        raise UsageError(
            f"--vocab-size {model.vocab_size} is smaller than the data's vocabulary "
            f"({meta.vocab_size}, from data.json): leave --vocab-size out to use the data's, or "
            "raise it"
        )
    return model


def open_windows(data_dir: Path, meta: DataMeta, split: str, context: int) -> TokenWindows:
    """The windows of one split; a --context that not even one window of the split can fill is
    a bad flag value (exit 2)."""
    tokens = meta.split(split).tokens
    path = data_dir / meta.split(split).file
    if tokens < context + 1:
        longest = f"use --context {tokens - 1} or less, or " if tokens > 1 else ""
        raise UsageError(
            f"--context {context}: {path} holds {tokens} tokens, fewer than one window "
            f"(context + 1): {longest}pack more text"
        )
    return TokenWindows(path, meta.dtype, context)


def fixed_eval_starts(val_windows: TokenWindows, count: int) -> np.ndarray:
    """The validation windows: the first `count` non-overlapping windows of val.bin (fewer when it
    is short), i.e. --eval-batches batches of batch_size x processes. The same every evaluation,
    so successive val losses are comparable."""
    return val_windows.strided_starts(0, min(count, val_windows.num_windows()))


def total_steps_for(config: TrainConfig, tokens_per_step: int) -> int:
    """--max-steps, or --max-tokens rounded up to whole steps, or the default."""
    if config.max_steps is not None:
        return config.max_steps
    if config.max_tokens is not None:
        return -(-config.max_tokens // tokens_per_step)
    return DEFAULT_MAX_STEPS


def restore_checkpoint(run: Run, checkpoint: Path, state: dict[str, Any]) -> None:
    """Put the optimizer, gradient scaler, data position, RNGs and counters back as they were
    when `checkpoint` was saved (the weights are already loaded)."""
    trainer = ckpt.read_trainer_state(checkpoint)
    run.optimizer.load_state_dict(trainer["optimizer"])
    set_hyperparameters(run.optimizer, run.config)  # options given to --resume win
    if run.scaler.is_enabled() and trainer.get("scaler"):
        run.scaler.load_state_dict(trainer["scaler"])
    run.stream.load_state_dict(state["data_position"])
    run.step = int(state["step"])
    run.tokens_seen = int(state["tokens_seen"])
    best = state.get("best_val_loss")
    run.best_val_loss = math.inf if best is None else float(best)
    run.elapsed_before = float(state.get("elapsed", 0.0))
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
    if run.dist.is_main and state.get("val_loss") is not None and state["val_loss"] == best:
        ckpt.mark_best(run.run_dir, checkpoint, state["val_loss"])  # a kill may have cut it short


def tokenizer_packed_the_bins(data_dir: Path, meta: DataMeta) -> bool | None:
    """Whether DATA_DIR/tokenizer.json is the one the bins were packed with (None: there is
    none). A new run refuses False (`mllm tokenize` re-run after `mllm pack`): it could never be
    sampled, since the tokenizer its ids mean is gone."""
    tokenizer = data_dir / "tokenizer.json"
    if not tokenizer.is_file():
        return None
    return sha256_file(tokenizer) == meta.tokenizer_sha256


def write_run_files(config: TrainConfig, tokenizer_matches: bool | None) -> None:
    """config.json (the resolved config), and copies of data.json and tokenizer.json (when it is
    the one the bins were packed with), so the run dir alone is enough for eval, generate and
    serve."""
    run_dir = config.run_dir
    # Without `resume`, so the file can start a new run as --config (flags win over it).
    atomic_write_json(run_dir / ckpt.RUN_CONFIG, config.model_dump(mode="json", exclude={"resume"}))
    atomic_write_bytes(run_dir / ckpt.RUN_DATA, (config.data_dir / DATA_JSON).read_bytes())
    tokenizer = config.data_dir / "tokenizer.json"
    if tokenizer_matches is None:
        warn(f"no {tokenizer}: generate and serve will need --tokenizer")
    elif not tokenizer_matches:  # only on --resume: a new run refuses it
        warn(f"{tokenizer} changed since the bins were packed: the run dir's copy is kept")
    else:
        atomic_write_bytes(run_dir / ckpt.RUN_TOKENIZER, tokenizer.read_bytes())


def describe_run(run: Run, resume_from: Path | None) -> None:
    """The parameter count and what the run will do, on stderr."""
    cfg = run.model.config
    info(
        f"GPT: {run.model.num_parameters():,} parameters (d_model {cfg.d_model}, {cfg.layers} "
        f"layers, {cfg.heads} heads, context {cfg.context}, vocab {cfg.vocab_size})"
    )
    processes = f", {run.dist.world_size} processes" if run.dist.enabled else ""
    compiled = ", compiled" if run.config.compile else ""
    info(
        f"training {run.total_steps:,} steps of {run.tokens_per_step:,} tokens on {run.device} "
        f"({DTYPE_NAMES[run.dtype]}{compiled}{processes}); run dir {run.run_dir}"
    )
    if resume_from is not None:
        info(f"resuming from {resume_from} (step {run.step:,})")


# --- The step (tuned for speed; keep numerics and the contract: (mean loss, grad norm)) ----------


class TrainingLoss(nn.Module):
    """GPT.loss as a module's forward: torch.compile then traces the loss with the model, and
    DDP's forward (which prepares the gradient all-reduce) runs on every step."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


def prepare_model(
    model: GPT, config: TrainConfig, device: torch.device, dist_info: DistributedInfo
) -> nn.Module:
    """The module `train_step` calls: the training loss, compiled when asked, then wrapped in
    DDP when distributed. It shares its parameters with `model`."""
    if device.type == "cpu":
        retain_freed_memory()  # reuse freed activations: no page faults per step (cpu_memory.py)
    module: nn.Module = TrainingLoss(model)
    if config.compile:
        module = torch.compile(module)
    if dist_info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=device_ids)
    return module


def train_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `micro_batches` (gradient accumulation; ranks synchronise
    gradients on the last micro-batch only). Returns the step's mean loss and the gradient norm
    before clipping, as device tensors: reading them would wait for the device."""
    accum = len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    for index, (x, y) in enumerate(micro_batches):
        with gradient_sync(module, enabled=index == accum - 1):
            with autocast(device, dtype):
                loss = module(x, y)
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    scaler.step(optimizer)  # skips the update when fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum, grad_norm


def gradient_sync(module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() for the micro-batches whose gradients are only accumulated."""
    if enabled or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def next_micro_batches(run: Run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's (x, y) micro-batches of the next global batch, on the device."""
    starts = run.stream.next_starts()
    per_micro = rank_micro_starts(starts, run.config.grad_accum, run.dist.world_size, run.dist.rank)
    return [to_device(run.train_windows.gather(s), run.device) for s in per_micro]


def to_device(
    batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) on the device; on CUDA through pinned memory, so the copy overlaps the GPU's work."""
    if device.type == "cuda":
        x, y = (t.contiguous().pin_memory().to(device, non_blocking=True) for t in batch)
        return x, y
    return batch[0].to(device), batch[1].to(device)


# --- The loop ------------------------------------------------------------------------------------


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

    def __init__(self, run: Run) -> None:
        self.run = run
        self.pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []
        self.interval_seconds = 0.0
        self.interval_steps = 0
        self.cold = True  # the next interval holds this process's first step
        self._started = 0.0

    def start_timer(self) -> None:
        synchronize(self.run.device)
        self._started = time.perf_counter()

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, lr, loss, grad_norm))

    def flush(self, stop_requested: bool) -> tuple[list[StepStats], bool]:
        """The pending steps' stats (averaged over ranks) and whether any rank asked to stop;
        raises NonFiniteLoss at the first step whose loss (or, without a gradient scaler,
        gradient norm) is not finite."""
        synchronize(self.run.device)
        self.interval_seconds += time.perf_counter() - self._started
        self.interval_steps += len(self.pending)
        values = torch.stack(
            [torch.stack([loss, norm.float()]) for _, _, loss, norm in self.pending]
        )
        stop = torch.tensor([float(stop_requested)], device=values.device)
        flat = torch.cat([values.flatten(), stop]).to(self.run.comm_device)
        if self.run.dist.enabled:
            dist.all_reduce(flat)
            flat[:-1] /= self.run.dist.world_size
        host = flat.tolist()
        stats = [
            StepStats(step, lr, host[2 * i], host[2 * i + 1])
            for i, (step, lr, _, _) in enumerate(self.pending)
        ]
        self.pending.clear()
        check_grads = not self.run.scaler.is_enabled()  # fp16 skips overflowing steps itself
        for stat in stats:
            if not math.isfinite(stat.loss) or (check_grads and not math.isfinite(stat.grad_norm)):
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


def run_loop(run: Run, stop: StopOnSignal) -> TrainResult:
    """Train from run.step to run.total_steps; see the module docstring for the boundaries."""
    if run.step >= run.total_steps:
        info(
            f"{run.run_dir} is already at step {run.step:,} of {run.total_steps:,}: nothing to "
            "do (raise --max-steps to train further)"
        )
        return TrainResult(run.step, run.last_checkpoint)
    tracker = StepTracker(run)
    tracker.start_timer()
    while run.step < run.total_steps:
        lr = lr_at(run.step, run.config, run.total_steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
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
        val_loss = evaluate(run) if boundary.evaluate else None
        new_best = val_loss is not None and val_loss < run.best_val_loss
        if new_best:
            run.best_val_loss = val_loss  # type: ignore[assignment]
        if boundary.checkpoint or new_best or stop_agreed:
            save_checkpoint(run, val_loss, new_best)
        if stop_agreed and run.step < run.total_steps:  # at the last step the run is complete
            return stopped_by_signal(run, stop)
        tracker.start_timer()
    return TrainResult(run.step, run.last_checkpoint)


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
    eta = (run.total_steps - run.step) * seconds / steps if steps else math.inf
    run.display.show(record, eta)


def model_flops_utilisation(run: Run, tokens_per_s: float) -> float:
    """Model FLOPs per second achieved over the peak of all devices of the run."""
    peak = run.peak_flops * run.dist.world_size
    return run.model.flops_per_token() * tokens_per_s / peak if peak > 0 else 0.0


def device_name(device: torch.device) -> str:
    """The GPU's name (it picks the peak FLOP/s from a table), else ""."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


def evaluate(run: Run) -> float:
    """Mean validation loss over the fixed validation windows (split across ranks), recorded in
    metrics.jsonl and drawn in loss.png."""
    starts = run.eval_starts[run.dist.rank :: run.dist.world_size]
    nats, count = sum_nll(
        run.model, run.val_windows, starts, run.config.batch_size, run.device, run.dtype
    )
    if run.dist.enabled:
        totals = torch.tensor([nats, count], dtype=torch.float64, device=run.comm_device)
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

    Every rank calls this (their RNG states are gathered); rank 0 writes.
    """
    rng_states = gather_objects(capture_rng_state(run.device), run.dist)
    if not run.dist.is_main:
        return
    state = {
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "data_position": run.stream.state_dict(),
        "val_loss": val_loss,
        "best_val_loss": None if math.isinf(run.best_val_loss) else run.best_val_loss,
        "total_steps": run.total_steps,
        "elapsed": run.elapsed,
        "world_size": run.dist.world_size,
        "dtype": DTYPE_NAMES[run.dtype],
        "model_config": run.model.config.model_dump(),
        "train_config": run.config.model_dump(mode="json"),
        "data": data_identity(run.meta),
        "mllm_version": __version__,
        "torch_version": torch.__version__,
    }
    trainer_state = {
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_states,
    }
    path = ckpt.write_checkpoint(run.run_dir, run.step, run.model, state, trainer_state)
    if new_best and val_loss is not None:
        ckpt.mark_best(run.run_dir, path, val_loss)
    ckpt.prune_checkpoints(run.run_dir, run.config.keep_last)
    run.last_checkpoint = path
    run.display.note(f"step {run.step:,}: saved {path}")


def gather_objects(obj: T, dist_info: DistributedInfo) -> list[T]:
    """`obj` from every rank, in rank order."""
    if not dist_info.enabled:
        return [obj]
    gathered: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


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


class StopOnSignal:
    """SIGINT and SIGTERM ask the loop to stop: it saves a checkpoint after the current step (one
    process) or at the next boundary (torchrun: ranks agree there) and exits with 128 + the signal
    number. A second signal gets the usual handling (stops at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        previous = self._previous.get(signum)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
