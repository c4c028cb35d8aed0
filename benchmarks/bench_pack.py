"""`mllm pack` against a plain `Tokenizer.encode_batch` loop, on a ~100 MB corpus.

Both run as their own processes on the same corpus, tokenizer, machine and thread count:
- baseline: this file with `--baseline`: read corpus.txt in 10,000-line chunks, `encode_batch`
  each chunk (rayon threads = --workers), append EOT after each document, write the ids to a
  uint16 file. Timed as a whole script (start-up included).
- pack: `python -m mllm pack --workers N --force` as a whole command (start-up, survey, bins
  and data.json written).
Each pair runs --repeats times, alternating; the figures are medians. Peak RSS: the largest
single process (pack and its workers; from wait4) and the sum over pack's process tree (sampled
every 20 ms from /proc). The token counts of the two must match.

The corpus: every paragraph (one per line, whitespace runs made one space; TinyStories'
`<|endoftext|>` and NUL separators are paragraph breaks) of shared/data and shared/data-extra,
about 12 MB, written once as is and then again in fresh shuffled orders with a varying prefix
"<r>.<i>: " (repetition r, paragraph i) until the target size, so no two lines are the same.
Note that repeated paragraphs favour word caches: the "first_pass" figures time both on the
first, all-distinct 12 MB alone.

    python benchmarks/bench_pack.py [--mb 100] [--workers N] [--repeats 3]

prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import BENCH_MODEL, cpu_name, paragraphs

REPO = Path(__file__).resolve().parent.parent
CHUNK_LINES = 10_000


def build_corpus(path: Path, target_bytes: int) -> int:
    """Write corpus.txt of about `target_bytes`; return the size of its first (distinct) pass."""
    lines = paragraphs()
    first_pass = sum(len(line.encode()) + 1 for line in lines)
    rng = random.Random(0)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for repetition in itertools.count():
            order = list(range(len(lines)))
            rng.shuffle(order)
            for i in order:
                prefix = f"{repetition}.{i}: " if repetition else ""
                line = f"{prefix}{lines[i]}\n"
                f.write(line)
                written += len(line.encode())
                if written >= target_bytes:
                    return first_pass
    return first_pass


def baseline_loop(corpus: str, tokenizer_path: str, output: str) -> None:
    """The plain loop: encode_batch over 10,000-line chunks, ids (EOT after each) to a file."""
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    eot = tokenizer.token_to_id("<|endoftext|>")
    with open(corpus, encoding="utf-8") as f, open(output, "wb") as out:
        while lines := list(itertools.islice(f, CHUNK_LINES)):
            ids: list[int] = []
            for encoding in tokenizer.encode_batch([line.rstrip("\n") for line in lines]):
                ids.extend(encoding.ids)
                ids.append(eot)
            np.asarray(ids, dtype=np.uint16).tofile(out)


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(pid: int) -> int:
    """RSS of a process and all its descendants (Linux /proc; 0 elsewhere)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += _rss_kb(current)
        stack.extend(_children(current))
    return total


def run_timed(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run a command; its wall time, the peak RSS of its largest process (wait4) and the peak of
    its whole tree's RSS (sampled)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO
    )
    peak_tree = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        while not done.is_set():
            peak_tree = max(peak_tree, tree_rss_kb(process.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = process.stderr.read() if process.stderr else b""
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}): {stderr.decode()[-2000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "tree_mb": peak_tree / 1024}


def compare(
    corpus: Path, tokenizer: Path, workdir: Path, workers: int, repeats: int
) -> dict[str, object]:
    """Run baseline and pack `repeats` times each, alternating; medians and peaks."""
    env = {**os.environ, "RAYON_NUM_THREADS": str(workers), "TOKENIZERS_PARALLELISM": "true"}
    baseline_out = workdir / f"{corpus.stem}.baseline.bin"
    packed = workdir / f"{corpus.stem}.packed"
    baseline_cmd = [sys.executable, __file__, "--baseline", str(corpus), str(tokenizer)]
    pack_cmd = [sys.executable, "-m", "mllm", "pack", "--corpus", str(corpus)]
    pack_cmd += ["--tokenizer", str(tokenizer), "--output-dir", str(packed)]
    pack_cmd += ["--workers", str(workers), "--force", "--quiet"]
    baseline_runs, pack_runs = [], []
    for _ in range(repeats):
        baseline_runs.append(run_timed([*baseline_cmd, str(baseline_out)], env))
        pack_runs.append(run_timed(pack_cmd, env))
    meta = json.loads((packed / "data.json").read_text())
    packed_tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    baseline_tokens = baseline_out.stat().st_size // 2
    mb = corpus.stat().st_size / 1e6
    baseline_s = statistics.median(r["seconds"] for r in baseline_runs)
    pack_s = statistics.median(r["seconds"] for r in pack_runs)
    return {
        "corpus_mb": round(mb, 1),
        "baseline_s": round(baseline_s, 2),
        "pack_s": round(pack_s, 2),
        "baseline_mb_s": round(mb / baseline_s, 2),
        "pack_mb_s": round(mb / pack_s, 2),
        "speedup": round(baseline_s / pack_s, 2),
        "pack_peak_rss_mb": round(max(r["peak_rss_mb"] for r in pack_runs), 1),
        "pack_tree_rss_mb": round(max(r["tree_mb"] for r in pack_runs), 1),
        "baseline_peak_rss_mb": round(max(r["peak_rss_mb"] for r in baseline_runs), 1),
        "tokens": packed_tokens,
        "tokens_match": packed_tokens == baseline_tokens,
        "encoder": meta.get("encoder"),
        "runs_s": {
            "baseline": [round(r["seconds"], 2) for r in baseline_runs],
            "pack": [round(r["seconds"], 2) for r in pack_runs],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=100, help="corpus size in MB")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=BENCH_MODEL.vocab_size)
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument("--baseline", nargs=3, metavar=("CORPUS", "TOKENIZER", "OUT"))
    args = parser.parse_args()
    if args.baseline:
        baseline_loop(*args.baseline)
        return

    with tempfile.TemporaryDirectory(prefix="bench_pack.") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        corpus = workdir / "corpus.txt"
        first_pass_bytes = build_corpus(corpus, int(args.mb * 1e6))
        first_pass = workdir / "first_pass.txt"
        with open(corpus, "rb") as f:
            first_pass.write_bytes(f.read(first_pass_bytes))
        tokenizer = workdir / "tokenizer.json"
        tokenize = [sys.executable, "-m", "mllm", "tokenize", "--corpus", str(first_pass)]
        tokenize += ["--output", str(tokenizer), "--vocab-size", str(args.vocab_size), "--quiet"]
        subprocess.run(tokenize, check=True, cwd=REPO)
        result = compare(corpus, tokenizer, workdir, args.workers, args.repeats)
        first = compare(first_pass, tokenizer, workdir, args.workers, args.repeats)
    print(
        json.dumps(
            {
                "bench": "pack",
                **result,
                "first_pass": {k: first[k] for k in ("corpus_mb", "speedup", "tokens_match")},
                "workers": args.workers,
                "vocab_size": args.vocab_size,
                "repeats": args.repeats,
                "cpu": cpu_name(),
                "cores": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
