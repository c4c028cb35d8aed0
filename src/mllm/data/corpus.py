"""`mllm corpus`: mix streamed sources into corpus.txt, one normalised, unique document per line.

The pipeline, per source (see sources.py for where documents come from):

    rows -> documents -> whitespace normalised -> shorter than --min-chars dropped
         -> buffered shuffle (--shuffle-buffer documents, seeded)

then across sources: each source gets a quota of `--max-lines` split by its weight; the next
document comes from a source drawn at random in proportion to its remaining quota (so sources
interleave evenly and quotas come out exact); a document already written (exact match after
normalisation) is dropped. A source that runs dry leaves a shortfall, reported and recorded; the
corpus is still written. corpus.txt and its sidecar corpus.json are written atomically.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import mmap
import random
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from mllm import __version__
from mllm.config import CorpusConfig
from mllm.console import err_console, info, is_quiet, make_progress, warn
from mllm.data.datadir import corpus_path, corpus_sidecar
from mllm.data.sources import SourceSpec, check_hub_reachable, read_documents, resolve_sources
from mllm.errors import UsageError
from mllm.fileio import atomic_open, atomic_write_json

# Characters that become a space besides Unicode whitespace (str.split's): control characters
# (C0 incl. NUL, DEL, C1), zero-width spaces and byte-order marks, which are invisible and only
# split words wrongly.
CONTROL_RE = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u200b\u2060\ufeff]")

CORPUS_FORMAT = "mllm.corpus/1"
DEDUP_RULE = "exact match after normalisation (8-byte BLAKE2b of the UTF-8 line)"
WHITESPACE_RULE = (
    "runs of whitespace and control characters (NUL included) become one space; ends stripped"
)


def normalise_whitespace(text: str) -> str:
    """One line of text: every run of whitespace (Unicode's included), control characters (NUL
    included), zero-width spaces and BOMs becomes one space; the ends are stripped.

    Same result as `re.sub(r"[\\s<controls>]+", " ", text).strip()`, 3-7x faster: str.split and
    isprintable run in C, and most text has no control characters at all.
    """
    if text.isprintable() and "  " not in text:  # printable: the only whitespace is " "
        return text.strip(" ")
    text = " ".join(text.split())
    if not text.isprintable() and CONTROL_RE.search(text):
        text = " ".join(CONTROL_RE.sub(" ", text).split())
    return text


@dataclass
class SourceCounts:
    """What happened to one source's documents; recorded in corpus.json and the summary."""

    requested: int = 0
    written: int = 0
    duplicates: int = 0
    too_short: int = 0
    shortfall: int = 0
    read: int = 0  # documents read (a few may still sit in the shuffle buffer at the end)
    layouts: dict[str, str] = field(default_factory=dict)  # document rule per file read


class SeenHashes:
    """A set of 64-bit document hashes in one flat table (open addressing, linear probing).

    A Python set of 10M ints costs ~800 MB (a 32-byte int object plus ~50 bytes of table per
    entry); this costs 8 bytes per slot, at most 70% full: 128 MiB for 10M documents, allocated
    lazily by the OS (an anonymous mmap) so small corpora touch only a few pages. A false
    duplicate needs two different documents with the same 64-bit hash: about n²/2⁶⁵, 3·10⁻⁶ for
    n = 10M documents.
    """

    MAX_LOAD = 0.7

    def __init__(self, expected: int) -> None:
        self._allocate(max(1024, 1 << math.ceil(math.log2(max(1, expected) / self.MAX_LOAD))))

    def _allocate(self, capacity: int) -> None:
        self._buffer = mmap.mmap(-1, capacity * 8)
        self._slots = memoryview(self._buffer).cast("Q")
        self._mask = capacity - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, data: bytes) -> bool:
        """Record `data`'s hash; False when it was already there (a duplicate)."""
        key = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1
        return self._insert(key)

    def _insert(self, key: int) -> bool:
        slots, mask = self._slots, self._mask
        index = key & mask
        while True:
            found = slots[index]
            if found == key:
                return False
            if found == 0:
                break
            index = (index + 1) & mask
        slots[index] = key
        self._count += 1
        if self._count > self.MAX_LOAD * (mask + 1):
            self._grow()
        return True

    def _grow(self) -> None:
        old = [key for key in self._slots if key]
        self._slots.release()
        self._buffer.close()
        self._allocate((self._mask + 1) * 2)
        for key in old:
            self._insert(key)


def split_quota(total: int, weights: list[float]) -> list[int]:
    """`total` documents split by `weights`, rounding by largest remainder (sums to `total`)."""
    weight_sum = sum(weights)
    exact = [total * weight / weight_sum for weight in weights]
    quotas = [math.floor(share) for share in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def buffered_shuffle(items: Iterable[str], buffer_size: int, rng: random.Random) -> Iterator[str]:
    """Yield `items` in a seeded random order, holding at most `buffer_size` of them at a time."""
    buffer: list[str] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = int(rng.random() * buffer_size)  # randrange is 10x slower, for no gain here
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def source_documents(spec: SourceSpec, counts: SourceCounts, config: CorpusConfig) -> Iterator[str]:
    """One source's documents, normalised, long enough, in seeded shuffled order."""

    def long_enough() -> Iterator[str]:
        for raw in read_documents(spec, counts.layouts):
            document = normalise_whitespace(raw)
            counts.read += 1
            if len(document) < max(config.min_chars, 1):
                counts.too_short += 1
                continue
            yield document

    rng = random.Random(f"{config.seed}:{spec.name}")
    return buffered_shuffle(long_enough(), config.shuffle_buffer, rng)


def mix_documents(
    streams: list[Iterator[str]], counts: list[SourceCounts], seed: int
) -> Iterator[bytes]:
    """Interleave the sources' documents by remaining quota, dropping exact duplicates; yield
    each kept document as one UTF-8 line. Sets the counts' written, duplicates and shortfall."""
    rng = random.Random(seed)
    remaining = [c.requested for c in counts]
    total_remaining = sum(remaining)
    seen = SeenHashes(total_remaining)
    while total_remaining > 0:
        draw = int(rng.random() * total_remaining)
        index = 0
        while draw >= remaining[index]:
            draw -= remaining[index]
            index += 1
        document = next(streams[index], None)
        if document is None:  # the source ran dry
            counts[index].shortfall = remaining[index]
            total_remaining -= remaining[index]
            remaining[index] = 0
            continue
        line = document.encode("utf-8", errors="replace")  # lone surrogates from JSON: "?"
        if not seen.add(line):
            counts[index].duplicates += 1
            continue
        counts[index].written += 1
        remaining[index] -= 1
        total_remaining -= 1
        yield line + b"\n"


def corpus_paths(config: CorpusConfig) -> tuple[Path, Path]:
    """corpus.txt and its sidecar corpus.json (same stem, .json)."""
    output = config.output or corpus_path(config.data_dir)
    if output.suffix.lower() == ".json":
        raise UsageError(f"--output {output}: must not end in .json (the sidecar is .json)")
    return output, corpus_sidecar(output)


def write_corpus(
    output: Path, sidecar: Path, lines: Iterable[bytes], total: int
) -> tuple[int, int, str]:
    """Write `lines` to `output` atomically with a progress bar; return (lines, bytes, sha256).
    The stale `sidecar` is removed just before the rename, so an old corpus.json never sits
    beside a new corpus.txt, even if the run is killed before the new one is written."""
    digest = hashlib.sha256()
    size = written = 0
    with atomic_open(output, "wb") as f, make_progress() as progress:
        task = progress.add_task(output.name, total=total)
        started = time.perf_counter()
        for line in lines:
            f.write(line)
            digest.update(line)
            size += len(line)
            written += 1
            if written % 256 == 0:
                rate = written / (time.perf_counter() - started)
                progress.update(
                    task, completed=written, description=f"{output.name} {rate:,.0f} docs/s"
                )
        progress.update(task, total=written, completed=written)  # 100% even after a shortfall
        sidecar.unlink(missing_ok=True)
    return written, size, digest.hexdigest()


def build_corpus(config: CorpusConfig) -> dict[str, Any]:
    """Write corpus.txt and corpus.json as `config` asks; return corpus.json's content."""
    started = time.perf_counter()
    output, sidecar = corpus_paths(config)
    specs = resolve_sources(config.source, config.ratio)
    check_hub_reachable(specs)
    quotas = split_quota(config.max_lines, [spec.weight for spec in specs])
    counts = [SourceCounts(requested=quota) for quota in quotas]
    _announce(specs, counts, output)

    streams = [source_documents(s, c, config) for s, c in zip(specs, counts, strict=True)]
    lines = mix_documents(streams, counts, config.seed)
    written, size, sha256 = write_corpus(output, sidecar, lines, total=sum(quotas))

    seconds = time.perf_counter() - started
    metadata = {
        "format": CORPUS_FORMAT,
        "corpus": output.name,
        "documents": written,
        "bytes": size,
        "sha256": sha256,
        "seed": config.seed,
        "filters": {
            "min_chars": config.min_chars,
            "dedup": DEDUP_RULE,
            "whitespace": WHITESPACE_RULE,
            "shuffle_buffer": config.shuffle_buffer,
        },
        "sources": [{**s.describe(), **asdict(c)} for s, c in zip(specs, counts, strict=True)],
        "config": config.model_dump(mode="json"),
        "mllm_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
    }
    atomic_write_json(sidecar, metadata)
    _report(specs, counts, output, written, size, seconds)
    return metadata


def _announce(specs: list[SourceSpec], counts: list[SourceCounts], output: Path) -> None:
    parts = [f"{s.name} {c.requested:,} ({s.given_as})" for s, c in zip(specs, counts, strict=True)]
    info(f"corpus: {output} from {'; '.join(parts)}")


def _report(
    specs: list[SourceSpec],
    counts: list[SourceCounts],
    output: Path,
    written: int,
    size: int,
    seconds: float,
) -> None:
    """Warn about shortfalls (even with --quiet: they change what the corpus is) and print the
    per-source summary table."""
    for spec, c in zip(specs, counts, strict=True):
        if c.shortfall:
            warn(
                f"source {spec.name} ran out: {c.written:,} of {c.requested:,} documents "
                f"written (shortfall {c.shortfall:,})"
            )
    if is_quiet():
        return
    table = Table(title=None, box=None, pad_edge=False)
    for heading in ("source", "requested", "written", "duplicates", "too short", "shortfall"):
        table.add_column(heading, justify="left" if heading == "source" else "right")
    for spec, c in zip(specs, counts, strict=True):
        table.add_row(
            spec.name,
            f"{c.requested:,}",
            f"{c.written:,}",
            f"{c.duplicates:,}",
            f"{c.too_short:,}",
            f"{c.shortfall:,}",
        )
    err_console.print(table)
    rate = written / seconds if seconds > 0 else 0.0
    info(
        f"wrote {written:,} documents ({size / 1e6:,.1f} MB) to {output} and "
        f"{corpus_sidecar(output).name} in {seconds:.1f} s ({rate:,.0f} docs/s)"
    )
