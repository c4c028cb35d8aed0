"""`mllm pack`: exact round trip, the split, determinism, set-atomic replacement, the fast
encoder's equivalence with the tokenizer, and every bad input through the real CLI."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from fixtures import SHARED_DATA, one_error_line, write_paragraphs
from mllm.config import PackConfig, TokenizeConfig
from mllm.data import pack as pack_module
from mllm.data.encoder import (
    PieceCacheEncoder,
    ReferenceEncoder,
    make_encoder,
    piece_cache_applies,
)
from mllm.data.loader import TokenWindows
from mllm.data.meta import check_bins, load_data_meta
from mllm.data.pack import ValSelection, pack_corpus, resolve_dtype, val_count
from mllm.data.textfile import split_documents
from mllm.data.tokenizer import EOT, eot_id, load_tokenizer, train_tokenizer
from mllm.errors import MllmError, UsageError

OUTPUTS = ("train.bin", "val.bin", "data.json")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """corpus.txt (~250 KB of WikiText and TinyStories paragraphs) and a 500-token tokenizer."""
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data not found")
    folder = tmp_path_factory.mktemp("pack")
    wiki = write_paragraphs(SHARED_DATA / "wikitext" / "wiki.test.raw", folder / "a", 150_000)
    tiny = SHARED_DATA / "tinystories" / "tinystories_val.txt"
    stories = write_paragraphs(tiny, folder / "b", 100_000)
    documents = [d for pair in zip(wiki, stories, strict=False) for d in pair]
    documents += wiki[len(stories) :]
    (folder / "corpus.txt").write_text("".join(d + "\n" for d in documents), encoding="utf-8")
    train_tokenizer(TokenizeConfig(data_dir=folder, vocab_size=500))
    return folder


@pytest.fixture(scope="module")
def tokenizer(data_dir: Path) -> Tokenizer:
    return load_tokenizer(data_dir / "tokenizer.json")


def corpus_documents(corpus: Path) -> list[str]:
    return split_documents(corpus.read_text(encoding="utf-8"))


def decode_documents(tokenizer: Tokenizer, ids: np.ndarray) -> list[str]:
    """Split a bin at EOT and decode each document (each must end with an EOT)."""
    eot = eot_id(tokenizer)
    ends = np.flatnonzero(ids == eot)
    assert len(ids) == 0 or ids[-1] == eot, "the last document must end with EOT"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [
        tokenizer.decode(ids[s:e].tolist(), skip_special_tokens=False)
        for s, e in zip(starts, ends, strict=True)
    ]


def read_split(folder: Path, name: str) -> np.ndarray:
    meta = load_data_meta(folder)
    return np.fromfile(folder / meta.split(name).file, dtype=meta.np_dtype)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in OUTPUTS if (folder / name).exists()}


def leftovers(folder: Path) -> list[str]:
    """Temporary files a failed run might leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def pack_cli(run_cli, *args: object) -> subprocess.CompletedProcess[str]:
    return run_cli("pack", *map(str, args))


# ---------------------------------------------------------------------------------------------
# Round trip, split and determinism through the real CLI
# ---------------------------------------------------------------------------------------------


def test_pack_round_trip_every_document_once(run_cli, data_dir: Path, tmp_path, tokenizer) -> None:
    result = pack_cli(run_cli, "--data-dir", data_dir, "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    meta = load_data_meta(tmp_path)
    check_bins(tmp_path, meta)
    documents = corpus_documents(data_dir / "corpus.txt")
    train = decode_documents(tokenizer, read_split(tmp_path, "train"))
    val = decode_documents(tokenizer, read_split(tmp_path, "val"))
    assert collections.Counter(train + val) == collections.Counter(documents)
    assert len(val) == meta.val.documents == max(1, round(len(documents) * 0.01))
    assert len(train) == meta.train.documents == len(documents) - len(val)
    # train keeps corpus order (and so does val)
    assert train == [d for d in documents if d in set(train)]
    assert meta.dtype == "uint16" and meta.vocab_size == 500 and meta.eot_id == eot_id(tokenizer)
    extra = meta.model_dump()
    assert extra["corpus"]["documents"] == len(documents)
    assert extra["encoder"] == "PieceCacheEncoder"
    assert extra["train"]["bytes"] == (tmp_path / "train.bin").stat().st_size


def test_deterministic_across_runs_and_worker_counts(run_cli, data_dir: Path, tmp_path) -> None:
    """Several blocks in flight at once (4.5 MB, 1 MiB blocks) come out in the same order."""
    corpus = tmp_path / "corpus.txt"
    lines = (data_dir / "corpus.txt").read_text(encoding="utf-8").splitlines()
    corpus.write_text("".join(f"{i}: {line}\n" for i in range(18) for line in lines))
    common = ("--corpus", corpus, "--tokenizer", data_dir / "tokenizer.json")
    for name, workers in (("one", 1), ("two", 2), ("three", 3)):
        result = pack_cli(run_cli, *common, "--output-dir", tmp_path / name, "--workers", workers)
        assert result.returncode == 0, result.stderr
    for name in ("train.bin", "val.bin"):
        one = (tmp_path / "one" / name).read_bytes()
        assert (
            one
            == (tmp_path / "two" / name).read_bytes()
            == (tmp_path / "three" / name).read_bytes()
        )
    assert load_data_meta(tmp_path / "one").pack_id == load_data_meta(tmp_path / "three").pack_id


def test_different_seed_different_split(run_cli, data_dir: Path, tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert pack_cli(run_cli, "--data-dir", data_dir, "--output-dir", a, "--seed", 1).returncode == 0
    assert pack_cli(run_cli, "--data-dir", data_dir, "--output-dir", b, "--seed", 2).returncode == 0
    assert (a / "val.bin").read_bytes() != (b / "val.bin").read_bytes()
    assert load_data_meta(a).pack_id != load_data_meta(b).pack_id
    assert load_data_meta(a).val.documents == load_data_meta(b).val.documents


def test_up_to_date_then_force_then_replaced_after_corpus_changes(
    run_cli, data_dir: Path, tmp_path: Path, tokenizer: Tokenizer
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes((data_dir / "corpus.txt").read_bytes())
    args = (
        "--corpus",
        corpus,
        "--tokenizer",
        data_dir / "tokenizer.json",
        "--output-dir",
        tmp_path,
    )
    assert pack_cli(run_cli, *args).returncode == 0
    first = snapshot(tmp_path)
    first_mtime = (tmp_path / "train.bin").stat().st_mtime_ns

    again = pack_cli(run_cli, *args)
    assert again.returncode == 0 and "up to date" in again.stderr
    assert (tmp_path / "train.bin").stat().st_mtime_ns == first_mtime

    forced = pack_cli(run_cli, *args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "train.bin").stat().st_mtime_ns != first_mtime
    assert snapshot(tmp_path)["train.bin"] == first["train.bin"]  # byte-identical re-run

    with corpus.open("a", encoding="utf-8") as f:
        f.write("A brand new document about packing.\nAnd another one, to be sure.\n")
    changed = pack_cli(run_cli, *args)
    assert changed.returncode == 0, changed.stderr
    meta = load_data_meta(tmp_path)
    assert meta.pack_id != json.loads(first["data.json"])["pack_id"]
    check_bins(tmp_path, meta)
    packed = decode_documents(tokenizer, read_split(tmp_path, "train"))
    packed += decode_documents(tokenizer, read_split(tmp_path, "val"))
    assert collections.Counter(packed) == collections.Counter(corpus_documents(corpus))
    assert leftovers(tmp_path) == []


def test_loader_reads_what_pack_wrote(run_cli, data_dir: Path, tmp_path: Path) -> None:
    assert pack_cli(run_cli, "--data-dir", data_dir, "--output-dir", tmp_path).returncode == 0
    meta = load_data_meta(tmp_path)
    windows = TokenWindows(tmp_path / meta.train.file, meta.dtype, context=16)
    assert windows.n_tokens == meta.train.tokens
    x, y = windows.gather(np.array([0, 5]))
    tokens = read_split(tmp_path, "train").astype(np.int64)
    assert x[1].tolist() == tokens[5:21].tolist() and y[1].tolist() == tokens[6:22].tolist()


# ---------------------------------------------------------------------------------------------
# Bad inputs through the real CLI: exit code, one stderr line, no partial file
# ---------------------------------------------------------------------------------------------


def fresh_inputs(data_dir: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("corpus.txt", "tokenizer.json"):
        (folder / name).write_bytes((data_dir / name).read_bytes())
    return folder


@pytest.mark.parametrize(
    ("corpus", "message"),
    [
        (None, "corpus not found"),
        (b"", "corpus is empty"),
        (b"\n\r\n\n", "has 0 document(s)"),
        (b"only one document\n", "has 1 document(s)"),
        (b"good line\nsecond \xc3\x28 line\n", "invalid byte at line 2"),
    ],
)
def test_bad_corpus(run_cli, data_dir: Path, tmp_path: Path, corpus, message: str) -> None:
    folder = fresh_inputs(data_dir, tmp_path / "d")
    if corpus is None:
        (folder / "corpus.txt").unlink()
    else:
        (folder / "corpus.txt").write_bytes(corpus)
    result = pack_cli(run_cli, "--data-dir", folder)
    assert result.returncode == 1
    assert message in one_error_line(result)
    assert snapshot(folder) == {} and leftovers(folder) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "tokenizer not found"),
        (b"{broken", "is not a tokenizers tokenizer.json"),
        (b'{"model": {"type": "WordPiece"}}', "is not a tokenizers tokenizer.json"),
    ],
)
def test_bad_tokenizer(run_cli, data_dir: Path, tmp_path: Path, content, message: str) -> None:
    folder = fresh_inputs(data_dir, tmp_path / "d")
    if content is None:
        (folder / "tokenizer.json").unlink()
    else:
        (folder / "tokenizer.json").write_bytes(content)
    result = pack_cli(run_cli, "--data-dir", folder)
    assert result.returncode == 1
    assert message in one_error_line(result)
    assert snapshot(folder) == {} and leftovers(folder) == []


def test_tokenizer_without_eot(run_cli, data_dir: Path, tmp_path: Path) -> None:
    folder = fresh_inputs(data_dir, tmp_path / "d")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["added_tokens"] = []
    del spec["model"]["vocab"][EOT]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    result = pack_cli(run_cli, "--data-dir", folder)
    assert result.returncode == 1
    assert "no <|endoftext|> token" in one_error_line(result)
    assert snapshot(folder) == {}


def big_vocab_tokenizer(data_dir: Path, target: Path) -> int:
    """The test tokenizer plus 70,000 added tokens that never occur in text: vocab > 65,536."""
    tokenizer = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    tokenizer.add_tokens([f"\u2603added{i}\u2603" for i in range(70_000)])
    tokenizer.save(str(target))
    return tokenizer.get_vocab_size()


def test_vocab_too_big_for_requested_uint16(run_cli, data_dir: Path, tmp_path: Path) -> None:
    folder = fresh_inputs(data_dir, tmp_path / "d")
    vocab = big_vocab_tokenizer(data_dir, folder / "tokenizer.json")
    result = pack_cli(run_cli, "--data-dir", folder, "--dtype", "uint16")
    assert result.returncode == 2
    assert "--dtype uint16 cannot hold a vocabulary of" in one_error_line(result)
    assert snapshot(folder) == {} and leftovers(folder) == []

    auto = pack_cli(run_cli, "--data-dir", folder, "--workers", 1)  # auto: uint32
    assert auto.returncode == 0, auto.stderr
    meta = load_data_meta(folder)
    assert meta.dtype == "uint32" and meta.vocab_size == vocab
    assert meta.model_dump()["encoder"] == "ReferenceEncoder"  # non-special added tokens
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    packed = decode_documents(tokenizer, read_split(folder, "train"))
    packed += decode_documents(tokenizer, read_split(folder, "val"))
    assert collections.Counter(packed) == collections.Counter(
        corpus_documents(folder / "corpus.txt")
    )


def test_output_dir_that_cannot_be_written(run_cli, data_dir: Path, tmp_path: Path) -> None:
    folder = fresh_inputs(data_dir, tmp_path / "d")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = pack_cli(run_cli, "--data-dir", folder, "--output-dir", blocker / "out")
    assert result.returncode == 1
    assert "cannot create folder" in one_error_line(result)
    assert snapshot(folder) == {}


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only folder")
def test_read_only_output_dir(run_cli, data_dir: Path, tmp_path: Path) -> None:
    folder = fresh_inputs(data_dir, tmp_path / "d")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        result = pack_cli(run_cli, "--data-dir", folder, "--output-dir", out)
    finally:
        out.chmod(0o700)
    assert result.returncode == 1
    assert "not writable" in one_error_line(result)
    assert list(out.iterdir()) == []


def test_bad_flag_values_are_usage_errors(run_cli, data_dir: Path, tmp_path: Path) -> None:
    for flags in (("--val-fraction", "1.5"), ("--workers", "0"), ("--dtype", "int8")):
        result = pack_cli(run_cli, "--data-dir", data_dir, "--output-dir", tmp_path, *flags)
        assert result.returncode == 2, flags
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(tmp_path) == {}


# ---------------------------------------------------------------------------------------------
# Failures mid-way keep the previous good outputs
# ---------------------------------------------------------------------------------------------


def test_failure_mid_way_keeps_previous_outputs(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fresh_inputs(data_dir, tmp_path / "d")
    pack_corpus(PackConfig(data_dir=folder, workers=1))
    before = snapshot(folder)
    with (folder / "corpus.txt").open("a", encoding="utf-8") as f:
        f.write("".join(f"extra document number {i}\n" for i in range(60_000)))  # > 1 block

    calls = 0
    real_call = pack_module.BlockEncoder.__call__

    def fail_on_second_block(self, block: bytes, to_val: bytes):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(28, "No space left on device")
        return real_call(self, block, to_val)

    monkeypatch.setattr(pack_module.BlockEncoder, "__call__", fail_on_second_block)
    with pytest.raises(OSError, match="No space left"):
        pack_corpus(PackConfig(data_dir=folder, workers=1))
    assert calls == 2
    assert snapshot(folder) == before
    assert leftovers(folder) == []
    check_bins(folder, load_data_meta(folder))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_full_disk_is_one_clear_error_and_keeps_previous_outputs(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fresh_inputs(data_dir, tmp_path / "d")
    pack_corpus(PackConfig(data_dir=folder, workers=1))
    before = snapshot(folder)
    (folder / "corpus.txt").write_text("another corpus\nwith two documents\n")

    # the staged bins write to /dev/full, where every write fails with ENOSPC
    def open_dev_full(_: Path, mode: str):
        return open("/dev/full", mode)  # StagedBins closes it

    monkeypatch.setattr(pack_module, "open", open_dev_full, raising=False)
    with pytest.raises(MllmError, match=r"cannot write train\.bin .*No space left on device"):
        pack_corpus(PackConfig(data_dir=folder, workers=1))
    assert snapshot(folder) == before
    assert leftovers(folder) == []


def test_interrupt_mid_way_keeps_previous_outputs(data_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C during encoding (two worker processes): exit 130, previous set intact, no temps."""
    folder = fresh_inputs(data_dir, tmp_path / "d")
    pack_corpus(PackConfig(data_dir=folder, workers=1))
    before = snapshot(folder)
    text = (folder / "corpus.txt").read_text(encoding="utf-8")
    with (folder / "corpus.txt").open("w", encoding="utf-8") as f:
        for i in range(40):  # ~10 MB: encoding takes a while even on a fast machine
            f.write("".join(f"{i}: {line}\n" for line in text.splitlines()))
    process = subprocess.Popen(
        [sys.executable, "-m", "mllm", "pack", "--data-dir", str(folder), "--workers", "2"],
        stderr=subprocess.PIPE,
        text=True,
        # A shell that runs the suite in the background (`make test &`) starts it with SIGINT
        # ignored, which the child would inherit (Python keeps an ignored SIGINT ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not leftovers(folder) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert leftovers(folder), "pack never started writing (or finished too fast to interrupt)"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in one_error_line(subprocess.CompletedProcess([], 130, "", stderr))
    assert snapshot(folder) == before
    assert leftovers(folder) == []


# ---------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    documents=st.integers(2, 3000),
    fraction=st.floats(0.001, 0.999),
    seed=st.integers(-(2**40), 2**40),
    chunks=st.lists(st.integers(1, 500), min_size=1, max_size=20),
)
def test_val_selection_exact_and_chunking_invariant(
    documents: int, fraction: float, seed: int, chunks: list[int]
) -> None:
    needed = val_count(documents, fraction)
    assert 1 <= needed <= documents - 1
    whole = ValSelection(documents, needed, seed).take(documents)
    assert whole.sum() == needed
    chunked = ValSelection(documents, needed, seed)
    parts, left = [], documents
    for size in [*chunks, documents]:
        take = min(size, left)
        parts.append(chunked.take(take))
        left -= take
        if not left:
            break
    assert np.array_equal(np.concatenate(parts), whole)


def test_val_selection_is_roughly_uniform() -> None:
    hits = np.zeros(50)
    for seed in range(2000):
        hits += ValSelection(50, 5, seed).take(50)
    assert hits.sum() == 2000 * 5
    assert hits.min() > 140 and hits.max() < 260  # expected 200 each


def test_val_count_needs_two_documents() -> None:
    with pytest.raises(MllmError, match="at least 2"):
        val_count(1, 0.5)
    assert val_count(2, 0.001) == 1 and val_count(2, 0.999) == 1 and val_count(1000, 0.01) == 10


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", 65_536) == "uint16"
    assert resolve_dtype("auto", 65_537) == "uint32"
    assert resolve_dtype("uint32", 500) == "uint32"
    with pytest.raises(UsageError, match="cannot hold"):
        resolve_dtype("uint16", 65_537)


# ---------------------------------------------------------------------------------------------
# The piece-cache encoder gives exactly the tokenizer's ids
# ---------------------------------------------------------------------------------------------


def test_piece_cache_matches_reference_on_real_text(data_dir: Path, tokenizer: Tokenizer) -> None:
    documents = corpus_documents(data_dir / "corpus.txt")
    eot = eot_id(tokenizer)
    assert piece_cache_applies(tokenizer)
    assert isinstance(make_encoder(tokenizer, eot), PieceCacheEncoder)
    reference = ReferenceEncoder(tokenizer, eot).encode(documents)
    small_cache = PieceCacheEncoder(tokenizer, eot, max_pieces=500)  # resets many times
    chunks = [documents[i : i + 97] for i in range(0, len(documents), 97)]
    assert np.array_equal(np.concatenate([small_cache.encode(c) for c in chunks]), reference)
    expected = []
    for document in documents[:50]:
        expected += [*tokenizer.encode(document, add_special_tokens=False).ids, eot]
    assert PieceCacheEncoder(tokenizer, eot).encode(documents[:50]).tolist() == expected


PIECES = [" ", "  ", "\t", "\u00a0", "\u3000", "\u2028", "\x85", "\x1c", "\r", "a", "Z", "é", "ß"]
PIECES += ["日本", "🙂", "7", "42", ".", ",", "'s", "'", "-", "@", "<|endoftext|>", "the", " the"]


@settings(max_examples=300, deadline=None)
@given(
    documents=st.lists(
        st.one_of(
            st.lists(st.sampled_from(PIECES), min_size=1, max_size=25).map("".join),
            st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n")),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_piece_cache_matches_reference_on_any_text(tokenizer: Tokenizer, documents) -> None:
    documents = [d for d in documents if d]
    eot = eot_id(tokenizer)
    expected = ReferenceEncoder(tokenizer, eot).encode(documents)
    encoder = PieceCacheEncoder(tokenizer, eot)
    assert np.array_equal(encoder.encode(documents), expected)
    assert np.array_equal(encoder.encode(documents), expected)  # again, from the cache


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.from_regex(r" ?(?:[A-Za-z]+|[0-9]+)", fullmatch=True),  # the BPE-model-only path
            st.from_regex(r" ?\S+", fullmatch=True),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_piece_encoding_matches_the_tokenizer(tokenizer: Tokenizer, pieces: list[str]) -> None:
    encoder = PieceCacheEncoder(tokenizer, eot_id(tokenizer))
    expected = [tokenizer.encode(p, add_special_tokens=False).ids for p in pieces]
    assert encoder._encode_pieces(pieces) == expected


def test_tokenizer_starts_a_pre_token_at_a_space_before_any_non_space(tokenizer) -> None:
    """The fact the piece cache rests on, checked for code points across all of Unicode (every
    one below U+3100, every 127th above): for any character c that Python's \\s does not match,
    encode(left + " " + c + "x") == encode(left) + encode(" " + c + "x")."""
    code_points = [*range(0x3100), *range(0x3100, 0x110000, 127)]
    chars = [chr(c) for c in code_points if not 0xD800 <= c < 0xE000 and not chr(c).isspace()]
    for left in ("word", "a  ", "!\t"):
        whole = tokenizer.encode_batch_fast([f"{left} {c}x" for c in chars])
        right = tokenizer.encode_batch_fast([f" {c}x" for c in chars])
        head = tokenizer.encode(left).ids
        mismatched = [
            c for c, w, r in zip(chars, whole, right, strict=True) if w.ids != head + r.ids
        ]
        assert mismatched == [], (left, mismatched[:10])


def test_temporary_files_of_a_killed_pack_are_removed(data_dir: Path, tmp_path: Path) -> None:
    folder = fresh_inputs(data_dir, tmp_path / "d")
    stale = folder / ".train.bin.x1y2z3.tmp"  # what a SIGKILL mid-pack leaves behind
    stale.write_bytes(b"\0" * 1024)
    other = folder / ".notes.txt.abc.tmp"  # not ours: left alone
    other.write_bytes(b"x")
    pack_corpus(PackConfig(data_dir=folder))
    assert not stale.exists()
    assert other.exists()
    check_bins(folder, load_data_meta(folder))
