"""`mllm pack`: corpus.txt + tokenizer.json -> train.bin, val.bin (token streams) + data.json.

Each document's ids are followed by `<|endoftext|>`; the bins are flat little-endian uint16
(uint32 for a vocabulary over 65,536) streams that `TokenWindows` reads with numpy.memmap.

How it works, in one pass after a quick survey:
1. Survey: read corpus.txt once in blocks of whole lines, to check it is UTF-8, count its
   documents per block and hash it (the sha256 goes into `pack_id`). Memory: one block.
2. Split: exactly `max(1, round(n * val_fraction))` documents go to val, chosen uniformly for the
   seed by sequential sampling (Knuth's algorithm S: document i is picked with probability
   needed / remaining), which decides in corpus order with no table of n entries.
3. Encode: worker processes (`--workers`, default every core) encode blocks with
   `PieceCacheEncoder` (same ids as the tokenizer, several times faster; see encoder.py) while
   this process reads the next blocks and writes results in order, so memory stays at a few
   blocks per worker whatever the corpus size.
4. Commit the outputs as a set. The bins are written to temporary files beside the outputs;
   only when both are complete: remove the old data.json, rename the bins into place, then
   write the new data.json (atomically). A reader that finds a data.json therefore finds the bins
   it describes (`check_bins` verifies their sizes; data.json also records their sha256). Any
   failure before that leaves the previous outputs untouched and no temporary file behind.

Re-running with unchanged inputs (same `pack_id` and dtype, bins intact) does nothing unless
`--force`; re-running after the corpus, tokenizer or split changed replaces the set.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from rich.markup import escape

from mllm import __version__
from mllm.config import PackConfig
from mllm.console import info, make_progress, warn
from mllm.data.datadir import (
    BINS,
    DATA_JSON,
    corpus_path,
    corpus_sidecar,
    tokenizer_path,
)
from mllm.data.encoder import DocumentEncoder, make_encoder
from mllm.data.meta import DataMeta, SplitMeta, check_bins, load_data_meta
from mllm.data.textfile import decode_block, iter_line_blocks, require_corpus, split_documents
from mllm.data.tokenizer import eot_id, read_tokenizer_file, tokenizer_from_bytes
from mllm.errors import MllmError, UsageError
from mllm.fileio import (
    atomic_write_json,
    ensure_writable_dir,
    fsync_dir,
    read_json,
    remove_stale_temp_files,
    sha256_file,
    temp_path_for,
)

SPLIT_METHOD = "exact count, sequential sampling (algorithm S), numpy PCG64"
UINT16_MAX_VOCAB = 1 << 16


@dataclass(frozen=True)
class PackPaths:
    corpus: Path
    tokenizer: Path
    output_dir: Path

    @classmethod
    def from_config(cls, config: PackConfig) -> PackPaths:
        return cls(
            corpus=config.corpus or corpus_path(config.data_dir),
            tokenizer=config.tokenizer or tokenizer_path(config.data_dir),
            output_dir=config.output_dir or config.data_dir,
        )

    @property
    def data_json(self) -> Path:
        return self.output_dir / DATA_JSON

    def bin(self, split: str) -> Path:
        return self.output_dir / BINS[split]


def resolve_dtype(requested: str, vocab_size: int) -> str:
    """uint16 when every id fits (vocab <= 65,536), else uint32; refuse a requested dtype that
    cannot hold the vocabulary."""
    fits_uint16 = vocab_size <= UINT16_MAX_VOCAB
    if requested == "auto":
        return "uint16" if fits_uint16 else "uint32"
    if requested == "uint16" and not fits_uint16:
        raise UsageError(
            f"--dtype uint16 cannot hold a vocabulary of {vocab_size:,} (ids up to 65,535): "
            "use --dtype uint32 or auto"
        )
    return requested


def worker_count(requested: int | None) -> int:
    """--workers, or every core this process may run on."""
    if requested:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Survey and split
# ---------------------------------------------------------------------------------------------


@dataclass
class CorpusSurvey:
    """What one read of corpus.txt found: its hash, size and documents per block."""

    sha256: str
    bytes: int
    documents_per_block: list[int]

    @property
    def documents(self) -> int:
        return sum(self.documents_per_block)


def survey_corpus(path: Path, on_bytes: Any) -> CorpusSurvey:
    """Hash corpus.txt, check it is UTF-8 (naming the first bad line) and count its documents."""
    digest = hashlib.sha256()
    per_block: list[int] = []
    lines = size = 0
    for block in iter_line_blocks(path):
        digest.update(block)
        per_block.append(len(split_documents(decode_block(block, path, lines))))
        lines += block.count(b"\n")
        size += len(block)
        on_bytes(len(block))
    return CorpusSurvey(digest.hexdigest(), size, per_block)


def val_count(documents: int, val_fraction: float) -> int:
    """Documents held out: round(n * fraction), at least one, and at least one left to train."""
    if documents < 2:
        raise MllmError(
            f"the corpus has {documents} document(s): need at least 2 (one line each) to split "
            "into train and val"
        )
    return min(documents - 1, max(1, round(documents * val_fraction)))


class ValSelection:
    """Picks exactly `needed` of `documents` documents for val, uniformly for `seed`, streaming.

    Knuth's algorithm S: each document in turn is picked with probability needed / remaining.
    The same (documents, needed, seed) gives the same choice however the calls are chunked.
    """

    def __init__(self, documents: int, needed: int, seed: int) -> None:
        self.remaining = documents
        self.needed = needed
        self.rng = np.random.default_rng(seed % (1 << 64))

    def take(self, count: int) -> np.ndarray:
        """Whether each of the next `count` documents goes to val (bool array)."""
        picked = np.zeros(count, dtype=bool)
        for i, draw in enumerate(self.rng.random(count).tolist()):
            if draw * self.remaining < self.needed:
                picked[i] = True
                self.needed -= 1
            self.remaining -= 1
        return picked


def make_pack_id(corpus_sha256: str, tokenizer_sha256: str, config: PackConfig) -> str:
    """Identity of the packed tokens: corpus, tokenizer and split (resume checks it)."""
    identity = {
        "corpus_sha256": corpus_sha256,
        "tokenizer_sha256": tokenizer_sha256,
        "val_fraction": config.val_fraction,
        "seed": config.seed,
        "split_method": SPLIT_METHOD,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Encoding blocks (in this process or in workers)
# ---------------------------------------------------------------------------------------------


@dataclass
class EncodedBlock:
    """One block's tokens, split into train and val (already in the bins' dtype)."""

    train: np.ndarray
    val: np.ndarray
    train_documents: int
    val_documents: int
    source_bytes: int


class BlockEncoder:
    """Encodes blocks of corpus lines given which of their documents go to val."""

    def __init__(self, tokenizer_bytes: bytes, source: str, dtype: str) -> None:
        tokenizer = tokenizer_from_bytes(tokenizer_bytes, source)
        self.encoder: DocumentEncoder = make_encoder(tokenizer, eot_id(tokenizer))
        self.dtype = np.dtype(dtype).newbyteorder("<")  # the bins are little-endian everywhere

    def __call__(self, block: bytes, to_val: bytes) -> EncodedBlock:
        documents = split_documents(block.decode("utf-8"))
        mask = np.frombuffer(to_val, dtype=bool)
        if len(documents) != len(mask):
            raise MllmError("the corpus changed while it was being packed: run mllm pack again")
        val = [d for d, v in zip(documents, mask.tolist(), strict=True) if v]
        train = [d for d, v in zip(documents, mask.tolist(), strict=True) if not v]
        return EncodedBlock(
            train=self.encoder.encode(train).astype(self.dtype, copy=False),
            val=self.encoder.encode(val).astype(self.dtype, copy=False),
            train_documents=len(train),
            val_documents=len(val),
            source_bytes=len(block),
        )


_worker_encoder: BlockEncoder | None = None


def _init_worker(tokenizer_bytes: bytes, source: str, dtype: str) -> None:
    """Worker set-up: one tokenizer thread (the workers are the parallelism), Ctrl-C left to the
    parent (which stops the pool), and the encoder built once per process."""
    global _worker_encoder
    os.environ["RAYON_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_encoder = BlockEncoder(tokenizer_bytes, source, dtype)


def _encode_in_worker(block: bytes, to_val: bytes) -> EncodedBlock:
    assert _worker_encoder is not None, "worker not initialised"
    return _worker_encoder(block, to_val)


def _ready() -> None:
    """A no-op task: the first submission makes the pool start its workers."""


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork on Linux: workers start in milliseconds with everything already imported. (The
    pool forks them all at its first submission, which `Encoders` makes at once, before any
    thread, such as a progress bar's, has started.) Elsewhere spawn, the safe choice on macOS
    and the only one on Windows."""
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


class Encoders:
    """Encodes (block, to_val) tasks in order, in `workers` processes (or here, for one)."""

    def __init__(self, workers: int, tokenizer_bytes: bytes, source: str, dtype: str) -> None:
        self.workers = workers
        self._local: BlockEncoder | None = None
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        if workers == 1:
            self._local = BlockEncoder(tokenizer_bytes, source, dtype)
            return
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=_pool_context(),
            initializer=_init_worker,
            initargs=(tokenizer_bytes, source, dtype),
        )
        self._pool.submit(_ready).result()  # start the workers now (see _pool_context)

    def map(self, tasks: Iterator[tuple[bytes, bytes]]) -> Iterator[EncodedBlock]:
        """Results in task order, with at most 2 tasks per worker in flight (bounded memory)."""
        if self._local is not None:
            for block, to_val in tasks:
                yield self._local(block, to_val)
            return
        assert self._pool is not None
        pending: collections.deque[concurrent.futures.Future[EncodedBlock]] = collections.deque()
        for block, to_val in tasks:
            pending.append(self._pool.submit(_encode_in_worker, block, to_val))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Encoders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Writing the bins and committing the set
# ---------------------------------------------------------------------------------------------


@dataclass
class StagedBin:
    """A bin being written to a temporary file beside its final name, hashed as it goes."""

    final: Path
    temp: Path
    file: IO[bytes]
    digest: Any = field(default_factory=hashlib.sha256)
    tokens: int = 0
    documents: int = 0
    bytes: int = 0

    def write(self, ids: np.ndarray, documents: int) -> None:
        data = ids.tobytes()
        with _clear_write_errors(self.final):
            self.file.write(data)
        self.digest.update(data)
        self.tokens += len(ids)
        self.documents += documents
        self.bytes += len(data)

    def split_meta(self) -> SplitMeta:
        return SplitMeta(
            file=self.final.name,
            tokens=self.tokens,
            documents=self.documents,
            bytes=self.bytes,
            sha256=self.digest.hexdigest(),
        )

    def finish(self) -> None:
        with _clear_write_errors(self.final):
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


@contextlib.contextmanager
def _clear_write_errors(path: Path) -> Iterator[None]:
    """A failed write (a full disk, most often) as one clear MllmError naming the file."""
    try:
        yield
    except OSError as e:
        raise MllmError(
            f"cannot write {path.name} in {path.parent}: {e.strerror or e} "
            "(free some space or pass another --output-dir); the previous outputs are kept"
        ) from None


class StagedBins:
    """train.bin and val.bin written to temporary files; `commit` puts them and data.json in
    place as a set, and leaving the block any other way deletes the temporary files."""

    def __init__(self, paths: PackPaths) -> None:
        self.paths = paths
        self.bins: dict[str, StagedBin] = {}

    def __enter__(self) -> StagedBins:
        try:
            for split in BINS:
                final = self.paths.bin(split)
                if removed := remove_stale_temp_files(final):
                    info(escape(f"removed {removed} temporary file(s) a killed pack left: {final}"))
                temp = temp_path_for(final)
                self.bins[split] = StagedBin(final, temp, open(temp, "wb"))
        except BaseException:
            self._discard()
            # A Ctrl-C between creating a temporary file and recording it would leave it behind.
            for split in BINS:
                remove_stale_temp_files(self.paths.bin(split))
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._discard()  # after a commit there is nothing left to discard

    def _discard(self) -> None:
        for staged in self.bins.values():
            with contextlib.suppress(OSError):  # e.g. the disk is still full: it is gone anyway
                staged.file.close()
            staged.temp.unlink(missing_ok=True)

    def commit(self, meta: DataMeta) -> None:
        """Old data.json out, new bins in, new data.json last (see the module docstring)."""
        for staged in self.bins.values():
            staged.finish()
        self.paths.data_json.unlink(missing_ok=True)
        fsync_dir(self.paths.output_dir)
        for staged in self.bins.values():
            os.replace(staged.temp, staged.final)
        fsync_dir(self.paths.output_dir)
        atomic_write_json(self.paths.data_json, meta.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def pack_corpus(config: PackConfig) -> DataMeta:
    """Pack corpus.txt into train.bin / val.bin / data.json as `config` asks; return data.json's
    content (the existing one when it is up to date)."""
    started = time.perf_counter()
    paths = PackPaths.from_config(config)
    require_corpus(paths.corpus, "run `mllm corpus` first, or pass --corpus")
    # Read once: the workers get these bytes, not the path, so they use exactly the tokenizer
    # that data.json names even if the file changes meanwhile.
    tokenizer_bytes = read_tokenizer_file(paths.tokenizer)
    tokenizer_sha = hashlib.sha256(tokenizer_bytes).hexdigest()
    tokenizer = tokenizer_from_bytes(tokenizer_bytes, paths.tokenizer)
    eot = eot_id(tokenizer)
    dtype = resolve_dtype(config.dtype, tokenizer.get_vocab_size())
    ensure_writable_dir(paths.output_dir)

    with make_progress(bytes_rate=True) as progress:
        task = progress.add_task(f"checking {paths.corpus.name}", total=None)
        survey = survey_corpus(paths.corpus, lambda n: progress.advance(task, n))
    pack_id = make_pack_id(survey.sha256, tokenizer_sha, config)
    if not config.force and _up_to_date(paths, pack_id, dtype):
        info(escape(f"{paths.data_json} is up to date (pack_id {pack_id}); --force re-encodes"))
        return load_data_meta(paths.output_dir)
    selection = ValSelection(
        survey.documents, val_count(survey.documents, config.val_fraction), config.seed
    )
    tasks = BlockTasks(paths.corpus, survey, selection)
    workers = worker_count(config.workers)
    with (
        Encoders(workers, tokenizer_bytes, str(paths.tokenizer), dtype) as encoders,
        StagedBins(paths) as staged,
        make_progress(bytes_rate=True) as progress,
    ):
        task = progress.add_task(f"packing {paths.corpus.name}", total=survey.bytes)
        for encoded in encoders.map(iter(tasks)):
            staged.bins["train"].write(encoded.train, encoded.train_documents)
            staged.bins["val"].write(encoded.val, encoded.val_documents)
            progress.advance(task, encoded.source_bytes)
        if tasks.digest.hexdigest() != survey.sha256:
            raise MllmError(f"{paths.corpus} changed while it was being packed: run again")
        meta = DataMeta(
            tokenizer_sha256=tokenizer_sha,
            vocab_size=tokenizer.get_vocab_size(),
            dtype=dtype,
            eot_id=eot,
            train=staged.bins["train"].split_meta(),
            val=staged.bins["val"].split_meta(),
            pack_id=pack_id,
            **_provenance(config, paths, survey, tokenizer, started),
        )
        staged.commit(meta)
    _report(paths, meta, time.perf_counter() - started)
    return meta


class BlockTasks:
    """The encoding tasks: each block of corpus.txt with which of its documents go to val.

    Reads the corpus a second time (the survey was the first) and hashes it again, so a corpus
    that changed in between is caught rather than packed under the old hash.
    """

    def __init__(self, corpus: Path, survey: CorpusSurvey, selection: ValSelection) -> None:
        self.corpus = corpus
        self.survey = survey
        self.selection = selection
        self.digest = hashlib.sha256()

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        counts = iter(self.survey.documents_per_block)
        for block in iter_line_blocks(self.corpus):
            self.digest.update(block)
            documents = next(counts, None)
            if documents is None:
                raise MllmError(f"{self.corpus} changed while it was being packed: run again")
            yield block, self.selection.take(documents).tobytes()


def _up_to_date(paths: PackPaths, pack_id: str, dtype: str) -> bool:
    """Whether data.json already describes these inputs, in this dtype, with intact bins."""
    if not paths.data_json.exists():
        return False
    try:
        meta = load_data_meta(paths.output_dir)
        check_bins(paths.output_dir, meta)
    except MllmError:
        return False
    return (
        meta.pack_id == pack_id
        and meta.dtype == dtype
        and meta.train.file == BINS["train"]
        and meta.val.file == BINS["val"]
    )


def _provenance(
    config: PackConfig, paths: PackPaths, survey: CorpusSurvey, tokenizer: Any, started: float
) -> dict[str, Any]:
    """data.json's extra keys: what was packed, how, and when."""
    return {
        "corpus": {
            "path": str(paths.corpus),
            "sha256": survey.sha256,
            "bytes": survey.bytes,
            "documents": survey.documents,
            "sidecar": _corpus_sidecar(paths.corpus, survey.sha256),
        },
        "tokenizer": {"path": str(paths.tokenizer)},
        "split": {
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "method": SPLIT_METHOD,
        },
        "encoder": type(make_encoder(tokenizer, eot_id(tokenizer))).__name__,
        "config": config.model_dump(mode="json"),
        "mllm_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _corpus_sidecar(corpus: Path, corpus_sha256: str) -> dict[str, Any] | None:
    """corpus.json (optional): recorded by path and hash; warns when it describes another file."""
    sidecar = corpus_sidecar(corpus)
    if not sidecar.is_file():
        return None
    try:
        described = read_json(sidecar, "corpus.json").get("sha256")
    except (MllmError, AttributeError):
        described = None
    if described is not None and described != corpus_sha256:
        warn(f"{sidecar} describes a different corpus.txt (its sha256 differs); recorded as is")
    return {
        "path": str(sidecar),
        "sha256": sha256_file(sidecar),
        "matches_corpus": described == corpus_sha256,
    }


def _report(paths: PackPaths, meta: DataMeta, seconds: float) -> None:
    corpus = (meta.model_extra or {})["corpus"]
    megabytes = corpus["bytes"] / 1e6
    outputs = ", ".join(map(str, (paths.bin("train"), paths.bin("val"), paths.data_json)))
    message = (
        f"packed {corpus['documents']:,} documents ({megabytes:,.1f} MB) into "
        f"{meta.train.tokens:,} train + {meta.val.tokens:,} val tokens ({meta.dtype}) in "
        f"{seconds:.1f}s ({megabytes / max(seconds, 1e-9):,.1f} MB/s): {outputs}"
    )
    info(escape(message))
