"""Streaming detokenisation (complete characters only) and stop-string matching."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures import train_tiny_tokenizer
from mllm.data.tokenizer import EOT, load_tokenizer
from mllm.textstream import StopMatcher, TextStream, TokenTextDecoder, token_byte_table


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path = train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def table(tokenizer) -> list[bytes]:
    return token_byte_table(tokenizer)


def byte_token(tokenizer, byte: int) -> int:
    """The id of the single-byte token for `byte` (byte-level alphabet)."""
    from mllm.textstream import byte_level_alphabet

    char = next(c for c, b in byte_level_alphabet().items() if b == byte)
    return tokenizer.token_to_id(char)


def stream_all(table: list[bytes], ids: list[int], stop: list[str] | None = None) -> list[str]:
    stream = TextStream(table, stop or [])
    chunks = []
    for token_id in ids:
        chunks.append(stream.push(token_id))
        if stream.stopped:
            break
    chunks.append(stream.finish())
    return chunks


def test_table_covers_the_vocab_and_special_tokens_are_empty(tokenizer, table) -> None:
    assert len(table) == tokenizer.get_vocab_size()
    assert table[tokenizer.token_to_id(EOT)] == b""
    assert all(len(table[byte_token(tokenizer, b)]) == 1 for b in (0, 10, 32, 65, 200, 255))


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60))
def test_streamed_text_equals_the_decoded_text(tokenizer, table, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert b"".join(table[i] for i in ids) == text.encode("utf-8")
    chunks = stream_all(table, ids)
    assert "".join(chunks) == text == tokenizer.decode(ids)
    assert all("\ufffd" not in chunk for chunk in chunks) or "\ufffd" in text


def test_a_character_split_over_tokens_waits_for_its_last_byte(tokenizer, table) -> None:
    encoded = "é🙂".encode()  # 2 + 4 bytes, fed one single-byte token at a time
    decoder = TokenTextDecoder(table)
    out = [decoder.push(byte_token(tokenizer, b)) for b in encoded]
    assert out == ["", "é", "", "", "", "🙂"]
    assert decoder.finish() == ""


def test_an_unfinished_character_at_the_end_becomes_a_replacement(tokenizer, table) -> None:
    decoder = TokenTextDecoder(table)
    assert decoder.push(byte_token(tokenizer, "é".encode()[0])) == ""
    assert decoder.finish() == "\ufffd"


def test_special_tokens_print_nothing(tokenizer, table) -> None:
    ids = [*tokenizer.encode("Hi").ids, tokenizer.token_to_id(EOT), *tokenizer.encode(" yo").ids]
    assert "".join(stream_all(table, ids)) == "Hi yo"


def test_stop_string_split_over_chunks_is_cut_and_not_shown() -> None:
    matcher = StopMatcher(["THE END"])
    assert matcher.push("and so THE") == "and so "
    assert matcher.push(" EN") == ""
    assert not matcher.stopped
    assert matcher.push("D. More") == ""
    assert matcher.stopped and matcher.matched == "THE END"
    assert matcher.push("later") == "" and matcher.finish() == ""


def test_held_back_text_is_released_when_no_stop_follows() -> None:
    matcher = StopMatcher(["\n\n"])
    assert matcher.push("line\n") == "line"
    assert matcher.push("next") == "\nnext"
    assert matcher.push("end\n") == "end"
    assert matcher.finish() == "\n"


def test_earliest_stop_wins_and_empty_stops_are_ignored() -> None:
    matcher = StopMatcher(["", "cd", "b"])
    assert matcher.push("abcd") == "a"
    assert matcher.matched == "b"
    assert StopMatcher([""]).push("text") == "text"


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="ab\n", max_size=30),
    st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3),
    st.lists(st.integers(1, 5), min_size=1, max_size=10),
)
def test_any_chunking_gives_the_text_before_the_first_completed_stop(text, stops, sizes) -> None:
    matcher = StopMatcher(stops)
    shown, position, index = "", 0, 0
    while position < len(text) and not matcher.stopped:
        size = sizes[index % len(sizes)]
        shown += matcher.push(text[position : position + size])
        position, index = position + size, index + 1
    shown += matcher.finish()
    assert shown == text_before_first_completed_stop(text, stops)
    assert matcher.stopped == any(stop in text for stop in stops)


def test_text_stream_stops_inside_a_token(tokenizer, table) -> None:
    ids = tokenizer.encode("Once upon a time there was a fox.").ids
    chunks = stream_all(table, ids, stop=["me th"])
    assert "".join(chunks) == "Once upon a ti"


def test_non_byte_level_tokenizer_falls_back_to_decoding_each_token(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, "[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    assert token_byte_table(tokenizer) == [b"hello", b"world", b"[UNK]"]


def text_before_first_completed_stop(text: str, stops: list[str]) -> str:
    """The oracle: generation stops as soon as a stop string has appeared, i.e. at the first end
    position where one completes; the text is cut where that stop string starts. (Cutting at the
    earliest START instead would depend on text not generated yet when the stream must stop.)"""
    for end in range(1, len(text) + 1):
        ended = [stop for stop in stops if text[:end].endswith(stop)]
        if ended:
            return text[: end - max(len(stop) for stop in ended)]
    return text
