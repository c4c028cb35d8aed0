"""What the benchmarks share: the bench model's shape, and what each records about the machine it
ran on (imported by the bench_*.py scripts, which run with this folder on sys.path)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from mllm.config import ModelConfig
from mllm.train.flops import machine_name

# The bench config of README.md and docs/: small enough for a laptop CPU, shaped like the real one.
BENCH_MODEL = ModelConfig(
    vocab_size=16_000, context=256, d_model=384, layers=6, heads=6, dropout=0.0
)
BENCH_BATCH_SIZE = 16  # sequences per step, where a benchmark trains

REPO = Path(__file__).resolve().parent.parent
SHARED_TEXT = [REPO.parent / "shared" / "data", REPO.parent / "shared" / "data-extra"]
SEPARATORS = re.compile(r"\n|\x00|<\|endoftext\|>")


def paragraphs() -> list[str]:
    """Every paragraph of the shared English text (shared/data and shared/data-extra, about
    12 MB), one line each: whitespace runs made one space, TinyStories' `<|endoftext|>` and NUL
    separators taken as paragraph breaks, paragraphs under 20 characters left out."""
    found: list[str] = []
    for folder in SHARED_TEXT:
        for path in sorted(folder.rglob("*")):
            if path.suffix not in (".txt", ".raw") or not path.is_file():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for part in SEPARATORS.split(text.replace("\r\n", "\n")):
                paragraph = " ".join(part.split())
                if len(paragraph) >= 20:
                    found.append(paragraph)
    if not found:
        sys.exit(f"no text found under {SHARED_TEXT}")
    return found


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): tells a run on busy cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
    """The CPU's model name, e.g. "AMD EPYC"."""
    return machine_name()
