"""Decode speed at batch 1: the KV-cache decoder of `mllm generate` against full recomputation.

For each model size (the bench config: 6 layers, 6 heads, d_model 384, context 256, vocab 16,000;
and the 220M default: 16 layers, 16 heads, d_model 1024, context 1024) and each precision, a
random-weight model generates `--new-tokens` tokens greedily from a `--prompt-tokens` prompt,
through the same code `mllm generate` runs (`generate_ids`). Decode tokens/s are timed from the
first new token on (the prompt's prefill is reported apart, as ms for prefill + first token).
The no-cache baseline feeds the whole sequence through `GPT.forward` for every token, in the same
process. Runs alternate and the median of `--repeats` is reported, since the machines are noisy.

Prints one JSON line, e.g.
  {"benchmark": "generate", ..., "bench": {"fp32": {"cached_tokens_per_s": ..., ...}}, ...}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from mllm.config import ModelConfig
from mllm.device import DTYPE_NAMES, DTYPES, resolve_decode_dtype
from mllm.generate import Decoder, SampleTiming, generate_ids, prepare_for_decoding, timed
from mllm.model import GPT
from mllm.sampling import SamplingParams, sample_next

CONFIGS = {
    "bench": ModelConfig(vocab_size=16_000, context=256, d_model=384, layers=6, heads=6),
    "default": ModelConfig(vocab_size=16_000, context=1024, d_model=1024, layers=16, heads=16),
}
GREEDY = SamplingParams(temperature=0)


def cached_run(model: GPT, prompt: list[int], new_tokens: int) -> SampleTiming:
    """The real `mllm generate` path: prefill, then one cached step per token."""
    timing = SampleTiming(prompt_tokens=len(prompt))
    for _ in timed(generate_ids(Decoder(model), prompt, GREEDY, new_tokens), timing):
        pass
    return timing


def no_cache_ids(model: GPT, prompt: list[int], new_tokens: int):
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


def measure(
    config: ModelConfig, dtype: torch.dtype, args: argparse.Namespace, baseline: bool
) -> dict:
    torch.manual_seed(0)
    model = prepare_for_decoding(GPT(config).eval().to(dtype))
    prompt = torch.randint(0, config.vocab_size, (args.prompt_tokens,)).tolist()
    cached_run(model, prompt, 8)  # warm-up: first-call allocations, kernel selection
    cached, no_cache = [], []
    for repeat in range(args.repeats):
        cached.append(cached_run(model, prompt, args.new_tokens))
        if baseline and repeat < args.baseline_repeats:
            no_cache.append(no_cache_run(model, prompt, args.new_tokens))
    result = {
        "cached_tokens_per_s": round(statistics.median(t.decode_tokens_per_s for t in cached), 1),
        "cached_runs": [round(t.decode_tokens_per_s, 1) for t in cached],
        "prefill_first_token_ms": round(
            1000 * statistics.median(t.first_token_s for t in cached), 2
        ),
    }
    if no_cache:
        rate = statistics.median(t.decode_tokens_per_s for t in no_cache)
        result["no_cache_tokens_per_s"] = round(rate, 1)
        result["no_cache_runs"] = [round(t.decode_tokens_per_s, 1) for t in no_cache]
        result["speedup"] = round(result["cached_tokens_per_s"] / rate, 2)
    return result


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="bench,default", help="bench, default or both")
    parser.add_argument("--dtypes", default="fp32,bf16", help="precisions to compare")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument(
        "--baseline-repeats", type=int, default=1, help="no-cache runs (slow: full recompute)"
    )
    parser.add_argument(
        "--baseline-dtypes", default="fp32", help="precisions that also run the no-cache baseline"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    report: dict = {
        "benchmark": "generate",
        "device": "cpu",
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": 1,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "auto_decode_dtype": DTYPE_NAMES[resolve_decode_dtype("auto", torch.device("cpu"))],
    }
    baseline_dtypes = set(args.baseline_dtypes.split(","))
    started = time.perf_counter()
    for name in args.configs.split(","):
        config = CONFIGS[name]
        report[name] = {"params_m": round(GPT(config).num_parameters() / 1e6, 1)}
        for dtype_name in args.dtypes.split(","):
            report[name][dtype_name] = measure(
                config, DTYPES[dtype_name], args, baseline=dtype_name in baseline_dtypes
            )
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
