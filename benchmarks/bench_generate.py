"""Decode speed at batch 1: the KV-cache decoder of `mllm generate` against full recomputation.

For each model size (the bench config, benchlib.BENCH_MODEL; and the 220M default: 16 layers, 16
heads, d_model 1024, context 1024), precision and CPU thread count, a random-weight model generates
`--new-tokens` tokens greedily from a `--prompt-tokens` prompt through the code `mllm generate`
runs (`prepare_for_decoding`, `Decoder`, `generate_ids`). Decode tokens/s are timed from the first
new token on; the prompt's prefill is reported apart (ms for prefill + first token). The no-cache
baseline feeds the whole sequence through `GPT.forward` for every token, in the same process, same
dtype and threads. Variants alternate within each repeat and medians are reported, since the
machines are shared and noisy; the load average at the start says how busy the machine was (at the
end it counts this benchmark too). The no-cache baseline runs at the first thread count only.

With transformers installed (a dev dependency: `pip install -e '.[dev]'`), a third variant is
Hugging Face transformers' own `generate` with its KV cache, greedy, on a LlamaForCausalLM of the
same size (d_model, layers, heads, SwiGLU hidden, vocab, tied head: the same matmuls; RMSNorm
and rotary positions where mllm has LayerNorm and a position table), the same dtype and threads.
Its decode rate is timed the same way, from the first new token on (a logits processor records
when each token's logits are ready). `--no-hf` leaves it out.

`--serve-batch 8` (the default; 0 leaves it out) adds, at the first thread count, the serve
engine (mllm.serve.engine.Engine, what `mllm serve` decodes with) generating for that many
prompts at once, against transformers' `generate` on the same batch: generated tokens per second
over all rows, decode steps only (the engine's own step timer; transformers' from its first new
token's logits to its last). That part runs in a fresh process set up as `mllm serve` is: its main
thread on 1 CPU thread, the engine's decode thread on the cores, and transformers in a thread of
its own while no engine is alive (an OpenMP team per thread: mllm.serve.engine, "CPU threads").

Prints one JSON line: machine facts, then one row per (config, dtype, threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import torch

from benchlib import BENCH_MODEL, cpu_name, load_average
from mllm.config import ModelConfig
from mllm.decode import Decoder, prepare_for_decoding
from mllm.device import DTYPE_NAMES, DTYPES, decode_threads, resolve_decode_dtype
from mllm.generate import SampleTiming, generate_ids, timed
from mllm.model import GPT
from mllm.sampling import SamplingParams, sample_next
from mllm.serve.engine import Completion, Engine, Event, Failed, Finished

CONFIGS = {
    "bench": BENCH_MODEL,
    "default": ModelConfig(vocab_size=16_000, context=1024, d_model=1024, layers=16, heads=16),
}
GREEDY = SamplingParams(temperature=0)


def cached_run(decoder: Decoder, prompt: list[int], new_tokens: int) -> SampleTiming:
    """The real `mllm generate` path: prefill, then one cached step per token."""
    timing = SampleTiming(prompt_tokens=len(prompt))
    for _ in timed(generate_ids(decoder, prompt, GREEDY, new_tokens), timing):
        pass
    return timing


def no_cache_ids(model: GPT, prompt: list[int], new_tokens: int) -> Iterator[int]:
    """The baseline: the whole sequence (up to the context) through the model for every token."""
    tokens = torch.tensor([prompt], dtype=torch.long)
    context = model.config.context
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(tokens[:, -context:], last_only=True)[:, -1]
            token = sample_next(logits, [GREEDY])
            yield int(token[0])
            tokens = torch.cat([tokens, token[:, None]], dim=1)


def no_cache_run(model: GPT, prompt: list[int], new_tokens: int) -> SampleTiming:
    timing = SampleTiming(prompt_tokens=len(prompt))
    for _ in timed(no_cache_ids(model, prompt, new_tokens), timing):
        pass
    return timing


def median_rate(timings: list[SampleTiming]) -> float:
    return round(statistics.median(t.decode_tokens_per_s for t in timings), 1)


def hf_model(config: ModelConfig, dtype: torch.dtype) -> torch.nn.Module | None:
    """transformers' LlamaForCausalLM with mllm's matmul shapes; None without transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    llama = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        intermediate_size=config.ffn_hidden, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=config.context, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(llama).to(dtype).eval()


def engine_rate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Generated tokens/s of the serve engine decoding `prompts` together (greedy, no stop)."""
    done = [threading.Event() for _ in prompts]

    def emit_for(index: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            if isinstance(event, Finished | Failed):
                done[index].set()

        return emit

    before = dataclasses.replace(engine.stats)
    engine.submit(
        [Completion(list(p), new_tokens, GREEDY, emit_for(i)) for i, p in enumerate(prompts)]
    )
    for event in done:
        event.wait()
    rows = engine.stats.rows_decoded - before.rows_decoded
    return rows / (engine.stats.decode_seconds - before.decode_seconds)


def fresh_engine_rate(model: GPT, prompts: list[list[int]], new_tokens: int, threads: int) -> float:
    """engine_rate of a new engine over `model`, stopped (its thread gone) before returning."""
    engine = Engine(model, [b"x"] * model.config.vocab_size, None, len(prompts), threads=threads)
    engine.start()
    try:
        engine_rate(engine, prompts, 8)  # warm-up
        return engine_rate(engine, prompts, new_tokens)
    finally:
        engine.stop()


def in_own_thread(work: Callable[[], float], threads: int) -> float:
    """`work()` run in a new thread with `threads` CPU threads."""
    result: list[float] = []

    def run() -> None:
        torch.set_num_threads(threads)
        result.append(work())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def hf_batch_rate(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> float:
    """Generated tokens/s of transformers' `generate` on the same batch (equal-length prompts,
    greedy), from the first new token's logits to the last's."""
    timing = hf_run(model, prompts, new_tokens)
    return len(prompts) * (timing.new_tokens - 1) / timing.decode_s


def measure_serve_batch(name: str, args: argparse.Namespace) -> list[dict]:
    """Rows for the serve engine's batch against transformers' at the same batch, measured in a
    fresh process whose main thread, as `mllm serve`'s, never runs a parallel kernel."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(serve_batch_rows, (name, args))


def serve_batch_rows(name: str, args: argparse.Namespace) -> list[dict]:
    """The serve-batch rows (runs in its own process, see measure_serve_batch).

    Like `mllm serve`, the main thread keeps 1 CPU thread and the engine's decode thread gets
    the cores (mllm.serve.engine, "CPU threads"). transformers runs in a thread of its own with
    the same count while no engine is alive, so each side has the only OpenMP team beside the
    idle main thread: a fresh engine per repeat."""
    torch.set_num_threads(1)
    threads = args.threads[0]
    config = CONFIGS[name]
    torch.manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (args.serve_batch, args.prompt_tokens)).tolist()
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        model = GPT(config).to(dtype).eval()
        hf = hf_model(config, dtype)
        ours, theirs = [], []
        for _ in range(args.repeats + 1):  # the first round warms both up
            ours.append(fresh_engine_rate(model, prompts, args.new_tokens, threads))
            hf_rate = functools.partial(hf_batch_rate, hf, prompts, args.new_tokens)
            theirs.append(in_own_thread(hf_rate, threads))
        ours, theirs = ours[1:], theirs[1:]
        row = {
            "config": name, "dtype": dtype_name, "threads": args.threads[0],
            "batch": args.serve_batch,
            "engine_tokens_per_s": round(statistics.median(ours), 1),
            "engine_runs": [round(r, 1) for r in ours],
            "hf_generate_tokens_per_s": round(statistics.median(theirs), 1),
            "hf_generate_runs": [round(r, 1) for r in theirs],
        }  # fmt: skip
        row["vs_hf_generate"] = round(
            row["engine_tokens_per_s"] / row["hf_generate_tokens_per_s"], 2
        )
        rows.append(row)
    return rows


def hf_run(
    model: torch.nn.Module, prompt: list[int] | list[list[int]], new_tokens: int
) -> SampleTiming:
    """transformers' `generate` (KV cache, greedy) for exactly `new_tokens` tokens from a prompt
    (or a batch of equal-length prompts); the decode rate from the first new token's logits to
    the last's."""
    ready: list[float] = []

    def note_time(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ready.append(time.perf_counter())
        return scores

    ids = torch.tensor(prompt if isinstance(prompt[0], list) else [prompt])
    began = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids, attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            logits_processor=[note_time], pad_token_id=0,
        )  # fmt: skip
    timing = SampleTiming(prompt_tokens=ids.shape[1])
    timing.first_token_s = ready[0] - began
    timing.new_tokens = len(ready)
    timing.decode_s = ready[-1] - ready[0]
    return timing


def measure_config(name: str, args: argparse.Namespace) -> list[dict]:
    """Rows for one model size: every dtype x thread count, the variants alternating."""
    config = CONFIGS[name]
    torch.manual_seed(0)
    fp32 = GPT(config).eval()
    prompt = torch.randint(0, config.vocab_size, (args.prompt_tokens,)).tolist()
    variants = []
    for dtype_name in args.dtypes.split(","):
        model = GPT(config).eval()
        model.load_state_dict(fp32.state_dict())
        model = prepare_for_decoding(model.to(DTYPES[dtype_name]))
        decoder = Decoder(model)  # one per model, as `mllm generate` keeps one for all samples
        hf = hf_model(config, DTYPES[dtype_name]) if args.hf else None
        for threads in args.threads:
            variants.append({"dtype": dtype_name, "threads": threads, "model": model,
                             "decoder": decoder, "hf": hf, "cached": [], "no_cache": [],
                             "hf_runs": []})  # fmt: skip
    del fp32
    for variant in variants:  # warm-up: first-call allocations, kernel selection
        torch.set_num_threads(variant["threads"])
        cached_run(variant["decoder"], prompt, 8)
        if variant["hf"] is not None:
            hf_run(variant["hf"], prompt, 8)
    for repeat in range(args.repeats):
        for variant in variants:
            torch.set_num_threads(variant["threads"])
            variant["cached"].append(cached_run(variant["decoder"], prompt, args.new_tokens))
            if variant["hf"] is not None:
                variant["hf_runs"].append(hf_run(variant["hf"], prompt, args.new_tokens))
            baseline = variant["dtype"] in args.baseline_dtypes
            baseline = baseline and variant["threads"] == args.threads[0]
            if baseline and repeat < args.baseline_repeats:
                run = no_cache_run(variant["model"], prompt, args.new_tokens)
                variant["no_cache"].append(run)
    rows = []
    for variant in variants:
        cached = variant["cached"]
        row = {
            "config": name,
            "params_m": round(variant["model"].num_parameters() / 1e6, 1),
            "dtype": variant["dtype"],
            "threads": variant["threads"],
            "cached_tokens_per_s": median_rate(cached),
            "cached_runs": [round(t.decode_tokens_per_s, 1) for t in cached],
            "prefill_first_token_ms": round(
                1000 * statistics.median(t.first_token_s for t in cached), 1
            ),
        }
        if variant["hf_runs"]:
            row["hf_generate_tokens_per_s"] = median_rate(variant["hf_runs"])
            row["hf_generate_runs"] = [round(t.decode_tokens_per_s, 1) for t in variant["hf_runs"]]
            row["vs_hf_generate"] = round(
                row["cached_tokens_per_s"] / row["hf_generate_tokens_per_s"], 2
            )
        if variant["no_cache"]:
            row["no_cache_tokens_per_s"] = median_rate(variant["no_cache"])
            row["speedup"] = round(row["cached_tokens_per_s"] / row["no_cache_tokens_per_s"], 2)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="bench,default", help="bench, default or both")
    parser.add_argument("--dtypes", default="fp32,bf16", help="precisions to compare")
    parser.add_argument(
        "--threads",
        default="1,2",
        help="CPU thread counts to compare, or 'auto' (what mllm generate would pick now)",
    )
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median)")
    parser.add_argument(
        "--baseline-dtypes",
        default="auto",
        help="precisions that also run the no-cache baseline, at the first thread count "
        "(auto: the one mllm generate picks)",
    )
    parser.add_argument(
        "--baseline-repeats", type=int, default=1, help="no-cache runs per variant (slow)"
    )
    parser.add_argument(
        "--no-hf", dest="hf", action="store_false", help="leave out transformers' generate"
    )
    parser.add_argument(
        "--serve-batch", type=int, default=8, help="the serve engine's batch (0: leave it out)"
    )
    args = parser.parse_args()
    args.threads = (
        [decode_threads().count]
        if args.threads == "auto"
        else [int(t) for t in args.threads.split(",")]
    )
    auto_dtype = DTYPE_NAMES[resolve_decode_dtype("auto", torch.device("cpu"))]
    args.baseline_dtypes = set(args.baseline_dtypes.replace("auto", auto_dtype).split(","))

    report: dict = {
        "benchmark": "generate",
        "device": "cpu",
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "batch": 1,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "auto_decode_dtype": auto_dtype,
        "load_average_start": load_average(),
    }
    started = time.perf_counter()
    rows = []
    for name in args.configs.split(","):
        rows += measure_config(name, args)
        if args.serve_batch and args.hf and importlib.util.find_spec("transformers") is not None:
            rows += measure_serve_batch(name, args)
    report["load_average_end"] = load_average()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["rows"] = rows
    print(json.dumps(report))


if __name__ == "__main__":
    main()
