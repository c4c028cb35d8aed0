"""`mllm tokenize` and the tokenizer helpers: exact vocab, full byte alphabet, EOT, lossless
round trip on any text, and one-line errors through the real CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, pre_tokenizers

from fixtures import SHARED_DATA, one_error_line, write_paragraphs
from mllm.config import TokenizeConfig
from mllm.data.tokenizer import (
    BYTE_ALPHABET_SIZE,
    EOT,
    eot_id,
    load_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
)
from mllm.errors import MllmError
from mllm.fileio import sha256_file

VOCAB = 600
TRICKY = [EOT, " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "é", "日本", "🙂", "a", "<|"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with corpus.txt (~150 KB of WikiText) and a VOCAB-token tokenizer.json."""
    source = SHARED_DATA / "wikitext" / "wiki.test.raw"
    if not source.exists():
        pytest.skip("shared data not found")
    data_dir = tmp_path_factory.mktemp("tok")
    write_paragraphs(source, data_dir / "corpus.txt", 150_000)
    train_tokenizer(TokenizeConfig(data_dir=data_dir, vocab_size=VOCAB))
    return data_dir


@pytest.fixture(scope="module")
def tokenizer(trained: Path) -> Tokenizer:
    return load_tokenizer(trained / "tokenizer.json")


def test_exact_vocab_full_byte_alphabet_and_eot(tokenizer: Tokenizer, trained: Path) -> None:
    assert tokenizer.get_vocab_size() == VOCAB
    vocab = tokenizer.get_vocab()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == BYTE_ALPHABET_SIZE
    assert set(alphabet) <= set(vocab)
    assert vocab[EOT] == eot_id(tokenizer)
    special = [t for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    assert [t.content for t in special] == [EOT]
    spec = json.loads((trained / "tokenizer.json").read_text())
    assert spec["normalizer"] is None and spec["post_processor"] is None
    assert spec["pre_tokenizer"]["type"] == "ByteLevel"
    assert spec["pre_tokenizer"]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel"


def test_sidecar_records_what_it_was_trained_on(trained: Path) -> None:
    meta = json.loads((trained / "tokenizer.meta.json").read_text())
    assert meta["sha256"] == tokenizer_sha256(trained / "tokenizer.json")
    assert meta["sha256"] == sha256_file(trained / "tokenizer.json")
    assert meta["vocab_size"] == VOCAB
    assert meta["bytes_read"] == (trained / "corpus.txt").stat().st_size
    assert meta["documents_read"] == len((trained / "corpus.txt").read_text().splitlines())


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_any_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(
        st.sampled_from(
            [EOT, " ", "  ", "\t", "\n", "\r\n", "\u00a0", "é", "日本", "🙂", "a", "<|"]
        ),
        max_size=30,
    ).map("".join)
)
def test_round_trip_tricky_pieces(tokenizer: Tokenizer, text: str) -> None:
    """Whitespace runs, non-ASCII, and the special token's own text all come back as they were;
    the literal "<|endoftext|>" is text, never the EOT id."""
    ids = tokenizer.encode(text).ids
    assert eot_id(tokenizer) not in ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_bare_from_file_would_treat_the_literal_as_eot(trained: Path) -> None:
    """Why load_tokenizer exists: tokenizers does not save encode_special_tokens."""
    bare = Tokenizer.from_file(str(trained / "tokenizer.json"))
    loaded = load_tokenizer(trained / "tokenizer.json")
    eot = eot_id(loaded)
    assert eot in bare.encode(f"a{EOT}b").ids
    assert eot not in loaded.encode(f"a{EOT}b").ids


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(MllmError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(MllmError, match="folder"):
        load_tokenizer(tmp_path)
    for content in ("{not json", '{"version": "1.0"}', "\x00\xff garbage"):
        bad = tmp_path / "bad.json"
        bad.write_text(content, encoding="utf-8", errors="surrogateescape")
        with pytest.raises(MllmError, match=r"not a tokenizers tokenizer\.json") as info:
            load_tokenizer(bad)
        assert "\n" not in str(info.value)


def test_eot_id_missing() -> None:
    from tokenizers import models

    with pytest.raises(MllmError, match=re.escape(f"no {EOT} token")):
        eot_id(Tokenizer(models.BPE()))


def test_cli_trains_exact_vocab_with_max_bytes(run_cli, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    corpus = trained / "corpus.txt"
    result = run_cli(
        "tokenize", "--corpus", corpus, "--output", out, "--vocab-size", 300, "--max-bytes", 50_000
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert load_tokenizer(out).get_vocab_size() == 300
    meta = json.loads((tmp_path / "t.meta.json").read_text())
    assert 0 < meta["bytes_read"] <= 50_000
    assert corpus.read_bytes()[: meta["bytes_read"]].endswith(b"\n")  # whole lines only


def test_cli_vocab_the_corpus_cannot_support(run_cli, tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat\n" * 20)
    result = run_cli("tokenize", "--data-dir", tmp_path, "--vocab-size", 5000)
    assert result.returncode == 1
    line = one_error_line(result)
    supported = int(re.search(r"supports only ([\d,]+) tokens", line).group(1).replace(",", ""))
    assert 257 < supported < 5000
    assert not (tmp_path / "tokenizer.json").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "corpus.txt"]  # no partial or temp file
    # the size it names is one it can build, exactly
    ok = run_cli("tokenize", "--data-dir", tmp_path, "--vocab-size", supported)
    assert ok.returncode == 0, ok.stderr
    assert load_tokenizer(tmp_path / "tokenizer.json").get_vocab_size() == supported


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "corpus not found"),
        (b"", "corpus is empty"),
        (b"\n\n\r\n", "no documents"),
        (b"fine line\nbad \xff byte\n", "not UTF-8 text: invalid byte at line 2"),
    ],
)
def test_cli_bad_corpus(run_cli, tmp_path: Path, content: bytes | None, message: str) -> None:
    if content is not None:
        (tmp_path / "corpus.txt").write_bytes(content)
    result = run_cli("tokenize", "--data-dir", tmp_path, "--vocab-size", 300)
    assert result.returncode == 1
    assert message in one_error_line(result)
    assert not (tmp_path / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_cli_max_bytes_below_the_first_line(run_cli, tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text("a first line much longer than ten bytes\nsecond\n")
    result = run_cli("tokenize", "--data-dir", tmp_path, "--vocab-size", 300, "--max-bytes", 10)
    assert result.returncode == 1
    assert "fits in --max-bytes 10" in one_error_line(result)
    assert not (tmp_path / "tokenizer.json").exists()


def test_cli_vocab_below_bytes_plus_eot_is_a_usage_error(run_cli, tmp_path: Path) -> None:
    result = run_cli("tokenize", "--data-dir", tmp_path, "--vocab-size", 256)
    assert result.returncode == 2
    assert "--vocab-size" in one_error_line(result)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab c\t\n'é🙂1.")), max_size=300), st.integers(1, 40))
def test_long_documents_are_cut_where_the_pre_tokenizer_starts_a_word(text: str, limit: int):
    from mllm.data.tokenizer import new_byte_level_bpe, word_aligned_pieces

    pieces = word_aligned_pieces(text, limit)
    assert "".join(pieces) == text
    split = new_byte_level_bpe().pre_tokenizer  # the one the trainer counts words with
    words = [w for w, _ in split.pre_tokenize_str(text)]
    assert [w for piece in pieces for w, _ in split.pre_tokenize_str(piece)] == words
