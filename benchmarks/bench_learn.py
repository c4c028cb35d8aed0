"""How much the bench model learns in a fixed wall-clock budget: nanoGPT's recipe against
mllm's defaults, and what each of the defaults' changes contributes.

The data: every paragraph of shared/data and shared/data-extra (about 12 MB of real English,
benchlib.paragraphs), an 8,000-token tokenizer (`mllm tokenize`), `mllm pack` (1 % of documents
held out). Each arm is one `mllm train` command on the bench model (6 layers, d_model 384, 6
heads, context 256, batch 16) given `--time-budget SECONDS`, run one after the other: the
command's wall time, start-up and compilation included, is what the budget buys. Then
`mllm eval --json` scores the run's final checkpoint on the whole val split.

The arms (the flags each adds to the common ones):
- baseline: nanoGPT's small-model recipe (AdamW, lr 1e-3, warmup 100, a cosine to 1e-4, beta2
  0.99, weight decay 0.1, clip 1.0, GPT-2's init). Its cosine is planned to end at the budget,
  as nanoGPT's own run is planned (time the first steps, then fix the step count): that is what
  --time-budget does with --schedule cosine, so it is never a long cosine cut off early.
- defaults: mllm's defaults, no optimizer, schedule or init flags at all.
- ablations (with --ablations): the defaults with one change undone each: adamw (AdamW for the
  matrices too), cosine (the cosine instead of wsd), gpt2_init (no zero-initialised residual
  projections), warmup100 (nanoGPT's 100 warmup steps instead of 20).

torch.compile's cache is warmed once before the arms (a 2-step run of the same shape in a
cache folder of the bench's own), so every arm starts from the same warm cache, as a user's
second run does: left cold, the first arm would pay a compilation (about 65 s on this 2-core Xeon)
that the later ones skip. Each arm's command still compiles (from that cache) inside its budget.

    python benchmarks/bench_learn.py [--budget 300] [--ablations] [--arms baseline,defaults]

prints one JSON line: per arm val loss, bits per byte, steps, tokens, seconds; and
`bpb_reduction` = 1 - defaults' bits per byte / baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import BENCH_BATCH_SIZE, BENCH_MODEL, REPO, cpu_name, load_average, paragraphs

VOCAB_SIZE = 8000
NANOGPT = [
    "--optimizer", "adamw", "--schedule", "cosine", "--no-zero-init-residual",
    "--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "100", "--beta2", "0.99",
    "--weight-decay", "0.1", "--grad-clip", "1.0",
]  # fmt: skip
ARMS = {
    "baseline": NANOGPT,
    "defaults": [],
    "adamw": ["--optimizer", "adamw"],
    "cosine": ["--schedule", "cosine"],
    "gpt2_init": ["--no-zero-init-residual"],
    "warmup100": ["--warmup-steps", "100"],
    "ns3": ["--muon-ns-steps", "3"],  # cheaper orthogonalisation (with --arms)
}
ABLATIONS = ["adamw", "cosine", "gpt2_init"]  # --ablations (warmup100, ns3: with --arms)


def mllm(
    *args: str | Path, capture: bool = False, compile_cache: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m mllm ARGS`; `compile_cache`: torch.compile's cache folder (each arm gets an
    empty one, so every arm pays a cold compilation, as a first run does, and none is helped
    by the graphs an earlier arm compiled)."""
    command = [sys.executable, "-m", "mllm", *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if compile_cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)
        env["TRITON_CACHE_DIR"] = str(compile_cache / "triton")
    return subprocess.run(command, check=True, cwd=REPO, env=env, text=True, capture_output=capture)


def prepare_data(data_dir: Path) -> dict:
    """corpus.txt of the shared text, the tokenizer, the bins; returns data.json."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = paragraphs()
    (data_dir / "corpus.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    mllm("tokenize", "--data-dir", data_dir, "--vocab-size", VOCAB_SIZE, "--quiet")
    mllm("pack", "--data-dir", data_dir, "--quiet")
    return json.loads((data_dir / "data.json").read_text())


SHAPE = [
    "--d-model", BENCH_MODEL.d_model, "--layers", BENCH_MODEL.layers,
    "--heads", BENCH_MODEL.heads, "--context", BENCH_MODEL.context,
    "--batch-size", BENCH_BATCH_SIZE,
]  # fmt: skip


def warm_compile_cache(data_dir: Path, runs: Path) -> None:
    """Two compiled steps of the bench shape, so every arm finds the same warm cache."""
    mllm(
        "train", "--data-dir", data_dir, "--run-dir", runs / "warm-up", "--max-steps", "2",
        *SHAPE, "--quiet", compile_cache=runs / "compile-cache",
    )  # fmt: skip


def run_arm(name: str, data_dir: Path, runs: Path, budget: float) -> dict:
    """One `mllm train --time-budget` command, timed as a whole, then its val bits per byte."""
    run_dir = runs / f"{name}_{budget:g}s"
    began = time.perf_counter()
    mllm(
        "train", "--data-dir", data_dir, "--run-dir", run_dir, "--time-budget", budget,
        *SHAPE, *ARMS[name], "--quiet", compile_cache=runs / "compile-cache",
    )  # fmt: skip
    seconds = time.perf_counter() - began
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]  # the last, not the best
    state = json.loads((checkpoint / "state.json").read_text())
    scored = mllm(
        "eval", "--run-dir", run_dir, "--checkpoint", checkpoint, "--data-dir", data_dir,
        "--json", capture=True,
    )  # fmt: skip
    result = json.loads(scored.stdout)
    record = {
        "val_loss": round(result["loss"], 4),
        "bits_per_byte": round(result["bits_per_byte"], 4),
        "steps": state["step"],
        "tokens": state["tokens_seen"],
        "seconds": round(seconds, 1),
        "planned_at_step": state["time_plan"]["planned_at_step"],
        "seconds_per_step": round(state["time_plan"]["seconds_per_step"], 4),
    }
    print(f"{name} at {budget:g} s: {record}", file=sys.stderr)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, action="append", help="seconds (repeatable)")
    parser.add_argument("--arms", default="baseline,defaults")
    parser.add_argument("--ablations", action="store_true", help="add " + ", ".join(ABLATIONS))
    parser.add_argument("--ablation-budget", type=float, help="ablations at this budget only")
    parser.add_argument("--work-dir", type=Path, help="keep the data and runs here")
    args = parser.parse_args()
    budgets = args.budget or [300.0]
    arms = args.arms.split(",")
    unknown = set(arms) - ARMS.keys()
    if unknown:
        sys.exit(f"unknown arms {sorted(unknown)}: choose from {sorted(ARMS)}")
    ablations = ABLATIONS if args.ablations else []

    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        meta = prepare_data(work / "data")
        warm_compile_cache(work / "data", work / "runs")
        results: dict[str, dict[str, dict]] = {}
        for budget in budgets:
            extra = ablations if args.ablation_budget in (None, budget) else []
            key = f"{budget:g}s"
            results[key] = {
                arm: run_arm(arm, work / "data", work / "runs", budget) for arm in arms + extra
            }
            base, new = results[key].get("baseline"), results[key].get("defaults")
            if base and new:
                results[key]["bpb_reduction"] = round(
                    1 - new["bits_per_byte"] / base["bits_per_byte"], 4
                )
    print(
        json.dumps(
            {
                "bench": "learn",
                "cpu": cpu_name(),
                "load_average": load_average(),
                "train_tokens": meta["train"]["tokens"],
                "val_tokens": meta["val"]["tokens"],
                "vocab_size": meta["vocab_size"],
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
