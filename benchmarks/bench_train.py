"""Training speed of `mllm train` on the bench config, beside a plain baseline, in one run.

What it measures and why, and the figures: docs/training-speed.md. Prints one JSON line.
mllm's step runs twice: with --optimizer adamw, the update the baseline does, so the two compare the
step's machinery ("ours"); and with Muon, the default optimizer ("ours_default"), whose ratio to
the baseline is `speedup_of_default_vs_baseline`.
Run: python benchmarks/bench_train.py [--steps 20] [--paired-steps 8]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchlib import BENCH_BATCH_SIZE, BENCH_MODEL, cpu_name, load_average
from mllm import attention
from mllm.config import ModelConfig, TrainConfig
from mllm.data.datadir import DATA_JSON
from mllm.data.meta import DataMeta, SplitMeta
from mllm.device import DTYPE_NAMES, autocast, pick_device, resolve_train_dtype
from mllm.distributed import DistributedInfo
from mllm.fileio import atomic_write_json
from mllm.losses import linear_cross_entropy
from mllm.model import GPT
from mllm.train.cpu_memory import retain_freed_memory
from mllm.train.flops import measure_matmul_flops, peak_flops
from mllm.train.optim import build_optimizer
from mllm.train.step import prepare_model, train_step

TRAIN_TOKENS = 1 << 20
VAL_TOKENS = 1 << 14


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    if args.worker:
        run_worker(args.worker, device)
        return
    dtype = resolve_train_dtype("auto", device)  # the default of mllm train
    model_config = BENCH_MODEL
    tokens_per_step = BENCH_BATCH_SIZE * model_config.context
    flops_per_token = GPT(model_config).flops_per_token()

    load_before = load_average()
    peaks = [measure_peak(device, dtype)]
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        data_dir = write_random_data(Path(tmp) / "data")
        paired = measure_paired_steps(device, args.paired_steps, peaks, dtype)
        parts = measure_parts(model_config, device, dtype, args.part_repeats)
        peaks.append(measure_peak(device, dtype))
        command, cli = run_mllm_train(data_dir, Path(tmp) / "run", args.steps, args.log_interval)
    peaks.append(measure_peak(device, dtype))
    peak = max(peaks)

    def rate(ms_per_step: float) -> dict[str, float]:
        tokens_per_s = tokens_per_step / (ms_per_step / 1e3)
        return {
            "tokens_per_s": round(tokens_per_s, 1),
            "ms_per_step": round(ms_per_step, 1),
            "mfu": round(flops_per_token * tokens_per_s / peak, 4),
        }

    ours_ms = statistics.median(paired["ours"])
    baseline_ms = statistics.median(paired["baseline_compiled"])
    result = {
        "benchmark": "train",
        "command": command,
        **rate(cli["ms_per_step"]),
        "precision": DTYPE_NAMES[dtype],
        "peak_flops": round(peak),
        "peak_flops_fp32": round(measure_peak(device, torch.float32)),
        "flops_per_token": flops_per_token,
        "tokens_per_step": tokens_per_step,
        "ms_per_step_at_100pct_mfu": round(flops_per_token * tokens_per_step / peak * 1e3, 1),
        # The compiled nanoGPT-style baseline, and its step time over ours, from the paired steps.
        "baseline_tokens_per_s": rate(baseline_ms)["tokens_per_s"],
        "speedup_vs_baseline": round(baseline_ms / ours_ms, 3),
        # mllm's default step (Muon) against the same baseline: the one issue 12's target counts
        "speedup_of_default_vs_baseline": round(
            baseline_ms / statistics.median(paired["ours_default"]), 3
        ),
        "mllm_train": cli,
        "paired_steps": {
            **{
                name: {
                    **rate(statistics.median(times)),
                    "speedup_of_ours": round(statistics.median(times) / ours_ms, 3),
                    "ms_min": round(min(times), 1),
                    "ms_all": [round(t) for t in times],
                }
                for name, times in paired.items()
            },
            "baseline_is": BASELINE_DESCRIPTION,
        },
        "parts_ms": parts,
        "changes": active_changes(device, dtype, model_config),
        "device": describe_device(device),
        "threads": torch.get_num_threads(),
        "load_average_at_start": load_before,
        "torch": torch.__version__,
        "config": {**BENCH_MODEL.model_dump(), "batch_size": BENCH_BATCH_SIZE},
    }
    print(json.dumps(result))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps of the mllm train run")
    parser.add_argument("--log-interval", type=int, default=5, help="steps per timed interval")
    parser.add_argument(
        "--paired-steps", type=int, default=8, help="timed steps of each side, alternated"
    )
    parser.add_argument("--part-repeats", type=int, default=3, help="timings of each part")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)  # see StepWorker
    return parser.parse_args()


# --- Data and peak -------------------------------------------------------------------------------


def write_random_data(data_dir: Path) -> Path:
    """Uniformly random uint16 tokens in train.bin / val.bin, and a data.json that describes them
    (there is no tokenizer: training only needs the bins and their metadata)."""
    data_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    vocab_size = BENCH_MODEL.vocab_size
    for name, count in (("train", TRAIN_TOKENS), ("val", VAL_TOKENS)):
        rng.integers(0, vocab_size, size=count, dtype=np.uint16).tofile(data_dir / f"{name}.bin")
    meta = DataMeta(
        tokenizer_sha256="0" * 64,
        vocab_size=vocab_size,
        dtype="uint16",
        eot_id=vocab_size - 1,
        train=SplitMeta(file="train.bin", tokens=TRAIN_TOKENS, documents=1),
        val=SplitMeta(file="val.bin", tokens=VAL_TOKENS, documents=1),
        pack_id="bench-train-random-tokens",
    )
    atomic_write_json(data_dir / DATA_JSON, meta.model_dump(mode="json"))
    return data_dir


def measure_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Matmul peak FLOP/s in `dtype`: the GPU table where known, else best of several runs."""
    if device.type == "cuda":
        return peak_flops("cuda", dtype, torch.cuda.get_device_name(device))
    return measure_matmul_flops(device, dtype, size=2048, repeats=8)


# --- 1. Paired steps: mllm train's step against the baseline ------------------------------------

BASELINE_DESCRIPTION = (
    "nanoGPT-style step on the same GPT: forward computing full logits, F.cross_entropy on "
    "fp32 logits (compiled with the model, or eager), attention by SDPA forward and backward "
    "(nanoGPT's; not mllm's CPU matmul backward), torch AdamW (fused only on CUDA, foreach "
    "on CPU), clip 1.0, autocast in the same precision"
)


class PlainLoss(nn.Module):
    """The baseline's loss: logits of every position, then cross-entropy in fp32."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def baseline_optimizer(model: GPT, device: torch.device) -> torch.optim.AdamW:
    """nanoGPT's configure_optimizers: decay on matrices, fused only on CUDA."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=fused or None)


def make_baseline_step(
    model_config: ModelConfig, device: torch.device, dtype: torch.dtype, compile: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    # nanoGPT's attention is SDPA, backward included: mllm's CPU backward (mllm.attention) is off
    # in this side's process.
    attention.MATMUL_BACKWARD_MAX_LENGTH = 0
    model = GPT(model_config).to(device)
    module = torch.compile(PlainLoss(model)) if compile else PlainLoss(model)
    optimizer = baseline_optimizer(model, device)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(device, dtype):
            loss = module(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_mllm_step(
    model_config: ModelConfig, device: torch.device, dtype: torch.dtype, optimizer_name: str
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The step `mllm train` runs, built by its own functions with its default config (but the
    optimizer: adamw, the baseline's update, or muon, mllm's default)."""
    config = TrainConfig(model=model_config, batch_size=BENCH_BATCH_SIZE, optimizer=optimizer_name)
    model = GPT(model_config).to(device)
    module = prepare_model(model, config, device, DistributedInfo())
    optimizer = build_optimizer(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        train_step(module, optimizer, scaler, [(x, y)], device, dtype, config.grad_clip)

    return step


# ours: mllm's step with AdamW (the baseline's update: the step's machinery compared);
# ours_default: with Muon, the optimizer `mllm train` runs by default.
SIDES = ("ours", "ours_default", "baseline_compiled", "baseline_eager")


def make_side_step(
    side: str, model_config: ModelConfig, device: torch.device, dtype: torch.dtype
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    if side in ("ours", "ours_default"):
        optimizer = "adamw" if side == "ours" else TrainConfig.model_fields["optimizer"].default
        return make_mllm_step(model_config, device, dtype, optimizer)
    return make_baseline_step(model_config, device, dtype, compile=side == "baseline_compiled")


def measure_paired_steps(
    device: torch.device, steps: int, peaks: list[float], dtype: torch.dtype
) -> dict[str, list[float]]:
    """Milliseconds per step of each side, one step of each in turn; each side runs in its own
    process (mllm train sets process-wide CPU state the baseline must not get: cpu_memory.py).
    The matmul peak is measured again after each round, into `peaks`."""
    workers = {side: StepWorker(side, device) for side in SIDES}  # started one after another
    try:
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        for _ in range(steps):
            for side, worker in workers.items():
                times[side].append(worker.step())
            peaks.append(measure_peak(device, dtype))
        return times
    finally:
        for worker in workers.values():
            worker.close()


class StepWorker:
    """A child process (this script with --worker SIDE) that builds one side's step, compiles it
    with two warm-up steps, then runs one timed step per request and answers its milliseconds."""

    def __init__(self, side: str, device: torch.device) -> None:
        self.side = side
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by close())
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", side, "--device", str(device)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self._read()  # "ready", after the warm-up

    def step(self) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        return float(self._read())

    def _read(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.seek(0)
            raise SystemExit(f"{self.side} worker failed:\n{self.log.read()[-3000:]}")
        return line.strip()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait()
        self.log.close()


def run_worker(side: str, device: torch.device) -> None:
    """The child side of StepWorker."""
    dtype = resolve_train_dtype("auto", device)
    model_config = BENCH_MODEL
    torch.manual_seed(0)
    step = make_side_step(side, model_config, device, dtype)
    batches = random_batches(model_config, device, 4)
    for x, y in batches[:2]:
        step(x, y)
    print("ready", flush=True)
    for index, _ in enumerate(sys.stdin):
        x, y = batches[index % len(batches)]
        print(timed(functools.partial(step, x, y), device), flush=True)


def random_batches(
    model_config: ModelConfig, device: torch.device, count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    shape = (BENCH_BATCH_SIZE, model_config.context + 1)
    vocab_size = model_config.vocab_size
    windows = [torch.randint(0, vocab_size, shape, generator=generator) for _ in range(count)]
    return [(w[:, :-1].to(device), w[:, 1:].to(device)) for w in windows]


def timed(work: Callable[[], object], device: torch.device) -> float:
    """Milliseconds `work` takes, device-synchronised."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# --- 2. mllm train itself ------------------------------------------------------------------------


def run_mllm_train(
    data_dir: Path, run_dir: Path, steps: int, log_interval: int
) -> tuple[str, dict]:
    """Run `python -m mllm train` with its defaults on the bench shape (but --optimizer adamw:
    the baseline's update); its warm intervals' tokens/s from metrics.jsonl."""
    args = [
        "train",
        "--data-dir", str(data_dir),
        "--run-dir", str(run_dir),
        "--context", str(BENCH_MODEL.context),
        "--d-model", str(BENCH_MODEL.d_model),
        "--layers", str(BENCH_MODEL.layers),
        "--heads", str(BENCH_MODEL.heads),
        "--dropout", str(BENCH_MODEL.dropout),
        "--batch-size", str(BENCH_BATCH_SIZE),
        "--max-steps", str(steps),
        "--log-interval", str(log_interval),
        "--eval-batches", "1",
        "--optimizer", "adamw",
        "--quiet",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mllm", *args], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"mllm train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open(encoding="utf-8")]
    intervals = [r for r in records if "tokens_per_s" in r]
    warm = [r["tokens_per_s"] for r in intervals if not r.get("cold")]
    if not warm:
        raise SystemExit("mllm train logged no warm interval: raise --steps")
    tokens_per_step = BENCH_BATCH_SIZE * BENCH_MODEL.context
    command = "python -m mllm " + " ".join(
        "DATA" if a == str(data_dir) else "RUN" if a == str(run_dir) else a for a in args
    )
    return command, {
        "ms_per_step": tokens_per_step / statistics.median(warm) * 1e3,
        "intervals": [
            {"step": r["step"], "tokens_per_s": round(r["tokens_per_s"], 1), "cold": r["cold"]}
            for r in intervals
        ],
        "best_warm_tokens_per_s": round(max(warm), 1),
        "final_loss": round(intervals[-1]["loss"], 4),
        "wall_s": round(wall, 1),
    }


# --- 3. Parts of a step --------------------------------------------------------------------------

PROFILE_CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention", ("scaled_dot_product",)),
    ("optimizer", ("aten::_fused_adam", "aten::_foreach", "aten::linalg_vector_norm")),
    ("fused_elementwise", ("CompiledFxGraph", "graph_")),
)


def measure_parts(
    model_config: ModelConfig, device: torch.device, dtype: torch.dtype, repeats: int
) -> dict[str, float]:
    """Median milliseconds of each part of mllm train's step, timed one part at a time, and of
    one step by kind of kernel."""
    config = TrainConfig(model=model_config, batch_size=BENCH_BATCH_SIZE, optimizer="adamw")
    model = GPT(model_config).to(device)
    optimizer = build_optimizer(model, config, device)
    module = prepare_model(model, config, device, DistributedInfo())
    x, y = random_batches(model_config, device, 1)[0]
    params = list(model.parameters())
    state: dict[str, torch.Tensor] = {}

    def forward() -> None:
        with autocast(device, dtype):
            state["loss"] = module(x, y)

    def backward() -> None:
        state["loss"].backward()

    def optimizer_step(optimizer: torch.optim.Optimizer = optimizer) -> None:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()

    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    for index in range(repeats + 2):  # two warm-up (compiling) rounds
        for name, work in (("forward", forward), ("backward", backward)):
            elapsed = timed(work, device)
            if index >= 2:
                times[name].append(elapsed)
        elapsed = timed(optimizer_step, device)
        if index >= 2:
            times["optimizer"].append(elapsed)
        if index < repeats + 1:
            optimizer.zero_grad(set_to_none=True)
    # The same update by the baseline's optimizer (torch's default AdamW), on the same gradients.
    plain_optimizer = baseline_optimizer(model, device)
    times["optimizer_baseline"] = [
        timed(functools.partial(optimizer_step, plain_optimizer), device)
        for _ in range(repeats + 1)
    ][1:]
    times.update(time_head_and_loss(model, y, device, dtype, repeats))
    parts = {name: round(statistics.median(values), 1) for name, values in times.items()}
    parts["step_by_kernel"] = profile_step(module, optimizer, x, y, device, dtype, config)
    return parts


def time_head_and_loss(
    model: GPT, targets: torch.Tensor, device: torch.device, dtype: torch.dtype, repeats: int
) -> dict[str, list[float]]:
    """Forward + backward of the head and the loss alone on fixed hidden states: ours (fused,
    chunked) and the baseline's (full logits, fp32 cross-entropy), both compiled."""
    hidden = torch.randn(*targets.shape, model.config.d_model, device=device, requires_grad=True)
    weight = model.head_weight

    def plain_head(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h, w).flatten(0, 1).float(), t.flatten())

    times = {}
    for name, loss_fn in (
        ("head_ce_fused", torch.compile(linear_cross_entropy)),
        ("head_ce_baseline", torch.compile(plain_head)),
    ):

        def head(loss_fn: Callable = loss_fn) -> None:
            with autocast(device, dtype):
                loss = loss_fn(hidden, weight, targets)
            loss.backward()

        times[name] = [timed(head, device) for _ in range(repeats + 2)][2:]
        hidden.grad = None
        weight.grad = None
    return times


def profile_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    config: TrainConfig,
) -> dict[str, float]:
    """Milliseconds of one train_step by kind of kernel (self time of the host-side ops: on CPU
    the time the kernels run; on GPUs, where kernels are asynchronous, launch time only)."""
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    with torch.profiler.profile() as profiler:
        train_step(module, optimizer, scaler, [(x, y)], device, dtype, config.grad_clip)
        synchronize(device)
    totals = dict.fromkeys([name for name, _ in PROFILE_CATEGORIES] + ["other"], 0.0)
    for event in profiler.key_averages():
        category = next(
            (name for name, keys in PROFILE_CATEGORIES if any(k in event.key for k in keys)),
            "other",
        )
        totals[category] += event.self_cpu_time_total / 1e3
    return {name: round(ms, 1) for name, ms in totals.items()}


# --- Description ---------------------------------------------------------------------------------


def active_changes(device: torch.device, dtype: torch.dtype, model_config: ModelConfig) -> list:
    """What makes mllm train's step fast, read from the objects it builds (not a fixed list)."""
    config = TrainConfig(model=model_config, optimizer="adamw")
    model = GPT(model_config)
    optimizer = build_optimizer(model, config, device)
    changes = []
    if dtype != torch.float32:
        changes.append(f"{DTYPE_NAMES[dtype]} autocast (--dtype auto picks it on this device)")
    if config.compile:
        changes.append("torch.compile of model + loss as one graph (TrainingLoss module)")
    changes.append(
        "fused chunked head + cross-entropy (mllm.losses): no full logits, the head's gradient "
        "computed in forward per row chunk (3 head matmuls, no recomputation)"
    )
    probe = torch.zeros(1, 1, model_config.context, 1, device=device, requires_grad=True)
    if attention.uses_matmul_backward(probe, model_config.dropout):
        changes.append(
            "attention's backward as batched matmuls from the flash kernel's log-sum-exp "
            "(mllm.attention; CPU, contexts up to "
            f"{attention.MATMUL_BACKWARD_MAX_LENGTH}), where SDPA's own CPU backward is slow"
        )
    if optimizer.defaults.get("fused"):
        changes.append(f"fused AdamW on {device.type} (one kernel for all parameters)")
    changes.append("no host sync per step (loss and grad norm read at log boundaries only)")
    if device.type == "cpu" and retain_freed_memory():  # what prepare_model applies on CPU
        changes.append("freed host memory kept in the process: no page faults per step")
    return changes


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_name()
    return device.type


if __name__ == "__main__":
    main()
