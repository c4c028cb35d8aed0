"""`mllm eval`: loss, perplexity and bits per byte of a checkpoint on a packed token file.

The split is cut into non-overlapping windows of `context + 1` tokens at stride `context`, so
every token after the first is predicted exactly once: window k scores tokens k·C+1 .. k·C+C,
each with the tokens before it *in its window* as context. The tokens left after the last full
window form one shorter window, scored the same way (its first token is the last one of the
previous window), so the whole split — or its first `--max-tokens` predictions — counts, and
nothing is scored twice. Sums are in float64 and batches are fixed, so a re-run prints the
same numbers.

- loss: mean next-token cross-entropy in nats per token; perplexity = exp(loss).
- bits per byte: total nats / ln 2 / the UTF-8 bytes of the text the scored tokens stand for
  (special tokens such as <|endoftext|> stand for no text). Unlike loss per token, it does not
  depend on the tokenizer, so models with different vocabularies can be compared.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mllm.config import EvalConfig
from mllm.console import warn
from mllm.data.datadir import DATA_JSON
from mllm.data.loader import TokenWindows
from mllm.data.meta import DataMeta, check_split_bin, load_data_meta
from mllm.errors import MllmError, UsageError

if TYPE_CHECKING:
    from mllm.train.checkpoint import DataIdentity

BYTES_CHUNK = 1 << 24  # tokens per chunk when counting bytes over a memmap


@dataclass(frozen=True)
class EvalSplit:
    """The token file to evaluate and the data.json that describes it."""

    name: str  # "val", "train", or the file's path
    path: Path
    meta: DataMeta


@dataclass(frozen=True)
class EvalResult:
    """What `mllm eval` reports (the --json object holds exactly these fields)."""

    checkpoint: str
    step: int | None
    split: str
    loss: float
    perplexity: float
    bits_per_byte: float | None  # None when the scored tokens stand for no text at all
    tokens: int  # tokens scored (predicted)
    bytes: int  # UTF-8 bytes of the text those tokens decode to
    windows: int
    context: int
    device: str
    dtype: str


def resolve_split(config: EvalConfig) -> EvalSplit:
    """`--split val|train` inside --data-dir, or the path of any packed .bin with its data.json
    beside it (which says the token dtype and the tokenizer it was packed with)."""
    if config.split in ("val", "train"):
        meta = load_data_meta(config.data_dir)
        path = check_split_bin(config.data_dir, meta, config.split)
        return EvalSplit(config.split, path, meta)
    path = Path(config.split)
    if path.suffix != ".bin" and not path.is_file():
        raise UsageError(
            f"--split: use val, train or the path of a packed .bin file (got {config.split!r})"
        )
    if not path.is_file():
        raise MllmError(f"token file not found: {path}")
    if not (path.parent / DATA_JSON).is_file():
        raise MllmError(
            f"{path} has no {DATA_JSON} beside it, so its token dtype and tokenizer are unknown: "
            f"evaluate a .bin that `mllm pack` wrote, in its own folder"
        )
    meta = load_data_meta(path.parent)
    name = next((n for n in ("train", "val") if meta.split(n).file == path.name), None)
    if name is None:
        raise MllmError(
            f"{path.parent / DATA_JSON} does not describe {path.name} (its bins are "
            f"{meta.train.file} and {meta.val.file}): evaluate a .bin that `mllm pack` wrote"
        )
    check_split_bin(path.parent, meta, name)
    return EvalSplit(str(path), path, meta)


def check_same_tokenizer(split: EvalSplit, trained_on: DataIdentity, checkpoint: Path) -> None:
    """Refuse tokens packed with another tokenizer than the one the checkpoint learned."""
    expected = trained_on.tokenizer_sha256
    if expected and split.meta.tokenizer_sha256 != expected:
        raise MllmError(
            f"{split.path} was packed with tokenizer sha256 {split.meta.tokenizer_sha256[:12]}…, "
            f"but {checkpoint} was trained with {expected[:12]}…: evaluate on data packed with "
            "the run's tokenizer (see the run dir's data.json)"
        )
    vocab = trained_on.vocab_size
    if split.meta.vocab_size != vocab:
        raise MllmError(
            f"{split.path} has vocab size {split.meta.vocab_size}, but {checkpoint} was trained "
            f"on vocab size {vocab}: evaluate on data packed with the run's tokenizer"
        )
    pack_id = trained_on.pack_id
    if pack_id and split.meta.pack_id != pack_id:
        warn(
            f"{split.path} is not from the pack {checkpoint} trained on (pack_id {pack_id} vs "
            f"{split.meta.pack_id}): a re-split or another corpus may share documents with what "
            "the model trained on, so this loss can read too low"
        )


def open_tokens(path: Path, dtype: np.dtype) -> np.memmap:
    """The whole token file as a read-only memmap (refusing a file cut mid-token)."""
    if path.stat().st_size % dtype.itemsize:
        raise MllmError(f"{path} is not a whole number of {dtype.name} tokens: re-run mllm pack")
    return np.memmap(path, dtype=dtype, mode="r")


def window_plan(n_tokens: int, context: int) -> tuple[int, int]:
    """(full windows, tokens predicted by the shorter last window) for `n_tokens` tokens."""
    predicted = n_tokens - 1
    return predicted // context, predicted % context


def count_text_bytes(tokens: np.ndarray, token_bytes: list[bytes]) -> int:
    """UTF-8 bytes of the text `tokens` decode to (special tokens: 0), chunk by chunk."""
    lengths = np.fromiter((len(b) for b in token_bytes), dtype=np.int64, count=len(token_bytes))
    total = 0
    for first in range(0, len(tokens), BYTES_CHUNK):
        chunk = np.asarray(tokens[first : first + BYTES_CHUNK], dtype=np.int64)
        total += int(lengths[chunk].sum())
    return total


def bits_per_byte(total_nats: float, n_bytes: int) -> float | None:
    return total_nats / math.log(2) / n_bytes if n_bytes else None


def evaluate(config: EvalConfig) -> EvalResult:
    """Score the checkpoint on the split; the core of `mllm eval`."""
    from mllm import console
    from mllm.device import DTYPE_NAMES, pick_device, resolve_eval_dtype
    from mllm.scoring import sum_nll
    from mllm.textstream import token_byte_table
    from mllm.train.checkpoint import find_checkpoint, load_checkpoint, load_run_tokenizer

    checkpoint = find_checkpoint(config.run_dir, config.checkpoint)
    split = resolve_split(config)
    device = pick_device(config.device)
    dtype = resolve_eval_dtype(config.dtype, device)
    loaded = load_checkpoint(checkpoint, device)  # fp32 weights; autocast picks the precision
    check_same_tokenizer(split, loaded.data, checkpoint)
    tokenizer = load_run_tokenizer(loaded)

    context = loaded.config.context
    tokens = open_tokens(split.path, split.meta.np_dtype)
    n_tokens = len(tokens)
    if config.max_tokens is not None:
        n_tokens = min(n_tokens, config.max_tokens + 1)
    if n_tokens < 2:
        raise MllmError(f"{split.path} holds {n_tokens} token(s): nothing to predict")
    full, rest = window_plan(n_tokens, context)
    console.info(
        f"evaluating {checkpoint} on {split.path}: {n_tokens - 1:,} tokens in "
        f"{full + bool(rest):,} windows of {context} ({device.type}, {DTYPE_NAMES[dtype]})"
    )

    total_nats, scored = 0.0, 0
    windows = TokenWindows(split.path, split.meta.dtype, context) if full else None
    with console.make_progress() as progress:
        task = progress.add_task("eval", total=full + bool(rest))
        for first in range(0, full, config.batch_size):
            starts = np.arange(first, min(first + config.batch_size, full), dtype=np.int64)
            nats, count = sum_nll(
                loaded.model, windows, starts * context, config.batch_size, device, dtype
            )
            total_nats, scored = total_nats + nats, scored + count
            progress.advance(task, len(starts))
        if rest:  # the shorter last window: tokens full·C .. full·C + rest
            tail = TokenWindows(split.path, split.meta.dtype, rest)
            starts = np.array([full * context], dtype=np.int64)
            nats, count = sum_nll(loaded.model, tail, starts, 1, device, dtype)
            total_nats, scored = total_nats + nats, scored + count
            progress.advance(task, 1)

    n_bytes = count_text_bytes(tokens[1:n_tokens], token_byte_table(tokenizer))
    loss = total_nats / scored
    return EvalResult(
        checkpoint=str(checkpoint),
        step=loaded.state.step,
        split=split.name,
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=bits_per_byte(total_nats, n_bytes),
        tokens=scored,
        bytes=n_bytes,
        windows=full + bool(rest),
        context=context,
        device=device.type,
        dtype=DTYPE_NAMES[dtype],
    )


def print_table(result: EvalResult) -> None:
    """The human-readable report, on stdout (it is the command's result)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mllm eval · {result.split}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    bpb = "n/a" if result.bits_per_byte is None else f"{result.bits_per_byte:.4f}"
    for label, value in (
        ("checkpoint", result.checkpoint),
        ("step", "" if result.step is None else f"{result.step:,}"),
        ("loss (nats/token)", f"{result.loss:.4f}"),
        ("perplexity", f"{result.perplexity:.2f}"),
        ("bits per byte", bpb),
        ("tokens scored", f"{result.tokens:,}"),
        ("text bytes", f"{result.bytes:,}"),
        ("windows", f"{result.windows:,} × {result.context}"),
        ("precision", f"{result.device} {result.dtype}"),
    ):
        table.add_row(label, value)
    Console(highlight=False).print(table)


def run_eval(config: EvalConfig) -> None:
    """The `mllm eval` command: a table, or one JSON line with --json; with --tasks, the
    lm-evaluation-harness tasks instead (mllm.harness)."""
    if config.tasks:
        from mllm.harness import print_results, run_tasks

        print_results(run_tasks(config), config.json_output)
        return
    if config.limit is not None:
        raise UsageError("--limit applies to --tasks only (use --max-tokens for the loss)")
    result = evaluate(config)
    if config.json_output:
        sys.stdout.write(json.dumps(asdict(result)) + "\n")
        sys.stdout.flush()
    else:
        print_table(result)
