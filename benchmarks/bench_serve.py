"""Throughput and latency of `mllm serve` with 1 and with N concurrent streaming clients.

Starts a real server (a subprocess on a free loopback port: the test layer's ServerProcess, from
tests/fixtures.py) over the bench-size model (benchlib.BENCH_MODEL) and drives it with httpx async
clients, each sending streaming completions back to back. Client counts take turns in rounds (1, 8,
1, 8, ...), so a change in the machine's load hits both alike; rates are medians over the rounds.
Prints ONE JSON line: per client count, requests/s, generated tokens/s, p50/p99 latency and time to
first token, and errors; and the ratio of generated tokens/s with N clients to that with 1
(continuous batching at work). The clients run on the same cores as the server. Each round
also runs `mllm generate` on the same run with the server's thread count, so the one-client
decode rate stands beside generate's own figure (tokens/s after the first token): as the client
sees it (the HTTP streaming, and the client itself, share the cores with the decode thread) and
as the server's decode thread spends it (/health's counters). The two share one decode path
(mllm.decode), and serve at one client must decode as fast.

Weights are random unless --run-dir names a trained run: decoding cost does not depend on what
the weights are (every request decodes exactly max_tokens: the random model is kept from ending
early, see `random_run`). The tokenizer is a real 16,000-token BPE trained on the shared English
text, so prompts and text are real.

    python benchmarks/bench_serve.py                      # 1 and 8 clients, 3 rounds of 10 s
    python benchmarks/bench_serve.py --clients 1 4 16 --rounds 5 --run-dir runs/default
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from benchlib import BENCH_MODEL
from mllm.config import TokenizeConfig
from mllm.data.tokenizer import EOT, load_tokenizer, train_tokenizer
from mllm.device import decode_threads
from mllm.model import GPT
from mllm.train.checkpoint import find_checkpoint, read_state

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the one home of a run dir's layout and of the launcher
from fixtures import ServerProcess, write_run  # noqa: E402

SHARED_TEXT = [
    REPO.parent / "shared" / "data" / "wikitext" / "wiki.test.raw",
    REPO.parent / "shared" / "data" / "tinystories" / "tinystories_val.txt",
]
PROMPTS = [
    "Once upon a time, a little girl named Lily found a shiny key in the garden.",
    "The history of the city begins in the twelfth century, when",
    "Tom and his dog went to the park. The sun was warm and",
    "In mathematics, a prime number is a natural number greater than one that",
    "She opened the old book and read the first line aloud:",
    "The river flows north through the valley before it reaches the sea, and",
    "After the storm, the villagers gathered in the square to",
    "The team scored in the last minute of the match, which meant that",
]


def train_bench_tokenizer(folder: Path) -> Path:
    """A 16,000-token tokenizer from `mllm tokenize` on the shared English text."""
    texts = [path for path in SHARED_TEXT if path.is_file()]
    if not texts:
        raise SystemExit(f"no text to train a tokenizer on: {SHARED_TEXT[0]} is missing")
    corpus = folder / "corpus.txt"
    with corpus.open("w", encoding="utf-8") as out:
        for path in texts:
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    out.write(line.strip() + "\n")
    config = TokenizeConfig(data_dir=folder, vocab_size=BENCH_MODEL.vocab_size)
    train_tokenizer(config)
    return folder / "tokenizer.json"


def random_run(folder: Path) -> Path:
    """A run dir holding a random bench-size GPT and a real tokenizer.

    Its end-of-text embedding points away from the final LayerNorm's bias (whose output minus
    bias has zero mean), so the EOT logit is far below the rest: every completion runs to
    max_tokens, and every run of the benchmark does the same amount of work.
    """
    tokenizer_path = train_bench_tokenizer(folder)
    tokenizer = load_tokenizer(tokenizer_path)
    eot_id = tokenizer.token_to_id(EOT)
    torch.manual_seed(0)
    model = GPT(BENCH_MODEL.model_copy(update={"vocab_size": tokenizer.get_vocab_size()}))
    with torch.no_grad():
        model.ln_final.bias.fill_(1.0)
        model.token_embedding.weight[eot_id] = -1.0
    run = folder / "bench-random"
    write_run(run, model, tokenizer_path, step=0, pack_id="bench-serve")
    return run


async def one_request(
    http: httpx.AsyncClient, body: dict[str, Any], sample: dict[str, list[float]]
) -> int:
    """One streamed completion; records latency and time to first token; returns tokens."""
    started = time.perf_counter()
    first_token = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first_token is None and any(c["text"] for c in chunk["choices"]):
                first_token = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    finished = time.perf_counter()
    sample["latency"].append(finished - started)
    sample["ttft"].append((first_token or finished) - started)
    if first_token is not None and tokens > 1 and finished > first_token:
        sample["decode"].append((tokens - 1) / (finished - first_token))
    return tokens


@dataclass
class Phase:
    """What one stretch of `clients` concurrent clients did."""

    clients: int
    seconds: float = 0.0
    requests: int = 0
    tokens: int = 0
    errors: int = 0
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)  # tokens/s after the first, per request
    engine_tokens: int = 0  # tokens the server's decode steps produced (its /health counters)
    engine_seconds: float = 0.0  # and the time those steps took


async def drive(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> Phase:
    """`clients` concurrent clients sending requests back to back for `seconds` (a request
    started before the deadline runs to its end)."""
    phase = Phase(clients)
    sample = {"latency": phase.latency, "ttft": phase.ttft, "decode": phase.decode}
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        deadline = time.perf_counter() + seconds

        async def client(index: int) -> None:
            request = 0
            while time.perf_counter() < deadline:
                body = {
                    "model": model,
                    "prompt": PROMPTS[(index + request) % len(PROMPTS)],
                    "max_tokens": max_tokens,
                    "temperature": 0.8,
                    "seed": index * 100_000 + request,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                request += 1
                try:
                    tokens = await one_request(http, body, sample)  # not `+= await`: races
                    phase.tokens += tokens
                    phase.requests += 1
                except (httpx.HTTPError, RuntimeError, ValueError) as error:
                    phase.errors += 1
                    print(f"request failed: {error}", file=sys.stderr)

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        phase.seconds = time.perf_counter() - started
    return phase


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(phases: list[Phase]) -> dict[str, Any]:
    """Rates: the median over rounds (the machine is noisy); latencies: pooled percentiles."""
    latency = [x for phase in phases for x in phase.latency]
    ttft = [x for phase in phases for x in phase.ttft]
    return {
        "clients": phases[0].clients,
        "rounds": len(phases),
        "seconds": round(sum(phase.seconds for phase in phases), 1),
        "requests": sum(phase.requests for phase in phases),
        "errors": sum(phase.errors for phase in phases),
        "requests_per_s": round(statistics.median(p.requests / p.seconds for p in phases), 3),
        "generated_tokens_per_s": round(statistics.median(p.tokens / p.seconds for p in phases), 1),
        "generated_tokens_per_s_by_round": [round(p.tokens / p.seconds, 1) for p in phases],
        "latency_p50_s": round(quantile(latency, 0.5), 4),
        "latency_p99_s": round(quantile(latency, 0.99), 4),
        "ttft_p50_s": round(quantile(ttft, 0.5), 4),
        "ttft_p99_s": round(quantile(ttft, 0.99), 4),
        "decode_tokens_per_s_after_first_p50": round(
            quantile([x for phase in phases for x in phase.decode], 0.5), 1
        ),
        "engine_decode_tokens_per_s": round(
            statistics.median(p.engine_tokens / p.engine_seconds for p in phases), 1
        ),
    }


def engine_counters(url: str) -> tuple[int, float]:
    """(tokens decoded, seconds spent decoding) so far, from the server's /health."""
    health = httpx.get(url + "/health").json()
    return health["decoded_tokens"], health["decode_seconds"]


GENERATE_RATE = re.compile(r"([\d.]+) tokens/s after")


def generate_rate(run_dir: Path, prompt: str, max_tokens: int, threads: int, seed: int) -> float:
    """`mllm generate` on the same run, as a user runs it: its own figure of tokens/s after the
    first token (start-up and prefill excluded, as in the serve figure it is compared with)."""
    command = [sys.executable, "-m", "mllm", "generate", prompt, "--run-dir", str(run_dir)]
    command += ["--max-new-tokens", str(max_tokens), "--temperature", "0.8", "--seed", str(seed)]
    command += ["--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    found = GENERATE_RATE.search(result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"mllm generate failed: {result.stderr[-500:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a trained run (default: random weights)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0, help="per round and count")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all client counts")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per completion")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument(
        "--server-threads", type=int, help="the server's --threads (default: its own default)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        run_dir = args.run_dir or random_run(folder)
        model_config = read_state(find_checkpoint(run_dir)).model
        server_threads = decode_threads(args.server_threads, reserved=1).count
        threads = [] if args.server_threads is None else ["--threads", str(args.server_threads)]
        server = ServerProcess(
            run_dir,
            *["--max-batch-size", str(args.max_batch_size), *threads],
            log_path=folder / "server.log",
            timeout=120,
        )
        with server:
            model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
            asyncio.run(drive(server.url, model, 2, 3.0, args.max_tokens))  # warm up
            phases: dict[int, list[Phase]] = {n: [] for n in args.clients}
            generate_rates: list[float] = []
            for round_index in range(args.rounds):  # interleaved: load changes hit all alike
                for n in args.clients:
                    tokens, seconds = engine_counters(server.url)
                    phase = asyncio.run(drive(server.url, model, n, args.seconds, args.max_tokens))
                    tokens_after, seconds_after = engine_counters(server.url)
                    phase.engine_tokens = tokens_after - tokens
                    phase.engine_seconds = seconds_after - seconds
                    phases[n].append(phase)
                # `mllm generate` with the server's thread count, while the server idles
                prompt = PROMPTS[round_index % len(PROMPTS)]
                rate = generate_rate(run_dir, prompt, args.max_tokens, server_threads, round_index)
                generate_rates.append(rate)

    results = [summarize(phases[n]) for n in args.clients]
    base = results[0]["generated_tokens_per_s"]
    one_client = results[0]["decode_tokens_per_s_after_first_p50"]
    one_client_engine = results[0]["engine_decode_tokens_per_s"]
    generate = statistics.median(generate_rates)
    report = {
        "bench": "serve",
        "weights": str(args.run_dir) if args.run_dir else "random",
        "model": model_config.model_dump(exclude={"dropout"}),
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "cpu_cores": os.cpu_count(),
        "server_threads": server_threads,
        "results": results,
        "one_client_vs_generate": {
            "clients": args.clients[0],
            "serve_decode_tokens_per_s": one_client,
            "serve_engine_decode_tokens_per_s": one_client_engine,
            "generate_decode_tokens_per_s": round(generate, 1),
            "generate_by_round": generate_rates,
            "ratio": round(one_client / generate, 3) if generate else None,
            "engine_ratio": round(one_client_engine / generate, 3) if generate else None,
        },
        "errors": sum(r["errors"] for r in results),
        f"tokens_per_s_ratio_{args.clients[-1]}_vs_{args.clients[0]}": round(
            results[-1]["generated_tokens_per_s"] / base, 2
        )
        if base
        else None,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
