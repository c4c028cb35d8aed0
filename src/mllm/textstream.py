"""Streaming text out of token ids, for `mllm generate` and `mllm serve`.

Two problems appear as soon as text is shown token by token:

1. A byte-level BPE token is a run of *bytes*, and a multi-byte UTF-8 character (é, 你, an emoji)
   can be split across two or more tokens. Decoding each token alone would print replacement
   characters. `TokenTextDecoder` keeps the raw bytes of every token and emits only complete
   characters (Python's incremental UTF-8 decoder holds back an unfinished sequence).
2. A stop string ("\\n\\n", "THE END") can arrive split over several tokens, and must not be
   printed. `StopMatcher` holds back any tail of the text that could still be the start of a stop
   string, and cuts the text where a stop string begins.

`TextStream` chains the two for one sequence of tokens. Typical use:

    table = token_byte_table(tokenizer)          # once per tokenizer
    stream = TextStream(table, stop=["\\n\\n"])    # once per sample / request
    for token_id in tokens:                      # as the model produces them
        print(stream.push(token_id), end="")
        if stream.stopped:
            break
    print(stream.finish())                       # what was held back, if no stop string came

Everything a stream returns, joined, is exactly the decoded text up to (not including) the first
stop string.
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Iterable, Sequence
from typing import Any


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte in
    a byte-level BPE vocabulary -> that byte (printable ASCII/Latin-1 bytes stand for themselves,
    the others are shifted to U+0100 and up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return {char: byte for byte, char in chars.items()}


def _is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer decodes bytes (ByteLevel decoder): its vocab strings map to bytes."""
    from tokenizers import decoders

    return isinstance(getattr(tokenizer, "decoder", None), decoders.ByteLevel)


def token_byte_table(tokenizer: Any) -> list[bytes]:
    """The UTF-8 bytes each token id stands for, indexed by id.

    Special tokens (<|endoftext|>) stand for no text: b"". For a byte-level BPE tokenizer (ours)
    the table is exact, so the bytes of a token sequence are the bytes of the text it encodes;
    for any other decoder each token's own decoded text is used (exact unless tokens split
    characters).
    """
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    added = tokenizer.get_added_tokens_decoder()  # id -> AddedToken
    alphabet = byte_level_alphabet() if _is_byte_level(tokenizer) else None
    table: list[bytes] = []
    for token_id in range(size):
        token = added.get(token_id)
        if token is not None:
            table.append(b"" if token.special else token.content.encode("utf-8"))
            continue
        piece = tokenizer.id_to_token(token_id)
        if piece is None:  # a hole in the id range: nothing to print
            table.append(b"")
        elif alphabet is not None and all(char in alphabet for char in piece):
            table.append(bytes(alphabet[char] for char in piece))
        else:
            table.append(tokenizer.decode([token_id], skip_special_tokens=True).encode("utf-8"))
    return table


class TokenTextDecoder:
    """Token ids in, text out, one token at a time: only complete UTF-8 characters are emitted;
    a byte sequence that can never be valid UTF-8 becomes U+FFFD."""

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token ("" while a character is still unfinished)."""
        return self._utf8.decode(self._token_bytes[token_id])

    def finish(self) -> str:
        """The end of the sequence: an unfinished character left over becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


class StopMatcher:
    """Cuts a text stream before the first stop string to complete, holding back text that may
    begin one."""

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = [stop for stop in stops if stop]
        self._pending = ""  # text received but not yet released
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream

    def push(self, text: str) -> str:
        """The part of the text received so far that is safe to show now."""
        if self.stopped:
            return ""
        pending = self._pending + text
        # The stream stops where a stop string first COMPLETES (scanning end positions in order),
        # so the result does not depend on how the text was split into chunks. Positions inside
        # the held-back text were scanned by earlier calls.
        for end in range(len(self._pending) + 1, len(pending) + 1):
            ended = [stop for stop in self.stops if pending.endswith(stop, 0, end)]
            if ended:
                stop = max(ended, key=len)  # of stops ending here, the one starting earliest
                self.stopped, self.matched, self._pending = True, stop, ""
                return pending[: end - len(stop)]
        keep = self._longest_partial_match(pending)
        self._pending = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def finish(self) -> str:
        """The end of the stream (without a stop string): release what was held back."""
        released, self._pending = self._pending, ""
        return "" if self.stopped else released

    def _longest_partial_match(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


class TextStream:
    """One generated sequence as text: complete characters only, cut before the first stop
    string. `stopped` turns true once a stop string has been seen (stop decoding then)."""

    def __init__(self, token_bytes: Sequence[bytes], stop: Iterable[str] = ()) -> None:
        self._decoder = TokenTextDecoder(token_bytes)
        self._matcher = StopMatcher(stop)

    @property
    def stopped(self) -> bool:
        return self._matcher.stopped

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._matcher.matched

    def push(self, token_id: int) -> str:
        """Text that is now safe to show after this token ("" is common)."""
        return self._matcher.push(self._decoder.push(token_id))

    def finish(self) -> str:
        """Everything still held back, at the end of the sequence."""
        return self._matcher.push(self._decoder.finish()) + self._matcher.finish()
