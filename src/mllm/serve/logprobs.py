"""Log-probabilities in the Completions API's shape: what the engine's `TokenLogprob`s (token ids
and numbers) become in a choice's `logprobs` (token strings, top_logprobs dicts, text offsets).

    tokens          each token as a string: its text, a special token by name (<|endoftext|>),
                    a token that is not whole UTF-8 (part of a character) as `bytes:\\xNN...`
    token_logprobs  log p(token | everything before it); null for the first prompt token
    top_logprobs    {token string: logprob} of the likeliest tokens, plus the chosen one
    text_offset     where each token starts in the choice's `text`, in characters

Offsets count the characters the tokens before it decode to: echoed prompt tokens from 0 (the
echoed text is the prompt's tokens decoded, special tokens by name), generated tokens from the
end of the echoed prompt (or 0 without echo; a special token adds no text there).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mllm.serve.engine import TokenLogprob
from mllm.serve.schema import CompletionLogprobs
from mllm.textstream import token_byte_table


@dataclass(frozen=True)
class TokenTable:
    """Per token id of the model's vocab: its string, what it adds to generated text, and what
    it shows in an echoed prompt."""

    strings: list[str]
    text_bytes: list[bytes]  # special tokens: b"" (they end text, they are not part of it)
    echo_bytes: list[bytes]  # special tokens: their name, so the echo shows what was sent

    @classmethod
    def of(cls, tokenizer: Any, vocab_size: int) -> TokenTable:
        """The table of a `tokenizers.Tokenizer`, padded to `vocab_size` (ids past the
        tokenizer's vocab, or holes in it, are named `<|token ID|>` and add no text)."""
        text_bytes = token_byte_table(tokenizer)
        added = tokenizer.get_added_tokens_decoder()
        strings, echo_bytes = [], []
        for token_id in range(vocab_size):
            special = added.get(token_id)
            piece = text_bytes[token_id] if token_id < len(text_bytes) else b""
            if special is not None and special.special:
                strings.append(special.content)
                echo_bytes.append(special.content.encode())
            elif not piece and tokenizer.id_to_token(token_id) is None:
                strings.append(f"<|token {token_id}|>")
                echo_bytes.append(b"")
            else:
                strings.append(token_string(piece))
                echo_bytes.append(piece)
        text_bytes = text_bytes[:vocab_size] + [b""] * max(0, vocab_size - len(text_bytes))
        return cls(strings, text_bytes, echo_bytes)

    def echo_text(self, ids: Iterable[int]) -> str:
        """The prompt as echoed: its tokens decoded (a broken character becomes U+FFFD)."""
        return b"".join(self.echo_bytes[i] for i in ids).decode("utf-8", errors="replace")


def token_string(piece: bytes) -> str:
    """A token's bytes as text, or `bytes:\\xNN...` where they are not whole UTF-8."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in piece)


class CharCounter:
    """Characters decoded so far from a stream of token bytes (a character split over tokens
    counts once complete)."""

    def __init__(self, start: int = 0) -> None:
        self.count = start
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, piece: bytes) -> int:
        """The offset before `piece`; then counts it."""
        before = self.count
        self.count += len(self._utf8.decode(piece))
        return before


class ChoiceLogprobs:
    """One choice's logprobs as they arrive (prompt first with echo, then token by token);
    `take` hands out what arrived since the last take (one streamed chunk's share), `result`
    everything."""

    def __init__(self, table: TokenTable, echo_length: int) -> None:
        self.table = table
        self.generated = CharCounter(start=echo_length)  # generated text follows the echo
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self._taken = 0

    def add(self, entries: Sequence[TokenLogprob], prompt: bool) -> None:
        table = self.table
        counter = CharCounter() if prompt else self.generated
        pieces = table.echo_bytes if prompt else table.text_bytes
        for entry in entries:
            self.tokens.append(table.strings[entry.token])
            self.token_logprobs.append(entry.logprob)
            self.top_logprobs.append(
                None
                if entry.top is None
                else {table.strings[token]: logprob for token, logprob in entry.top}
            )
            self.text_offset.append(counter.push(pieces[entry.token]))

    def take(self) -> CompletionLogprobs:
        start, self._taken = self._taken, len(self.tokens)
        return self._slice(start, self._taken)

    def result(self) -> CompletionLogprobs:
        return self._slice(0, len(self.tokens))

    def _slice(self, start: int, stop: int) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=self.tokens[start:stop],
            token_logprobs=self.token_logprobs[start:stop],
            top_logprobs=self.top_logprobs[start:stop],
            text_offset=self.text_offset[start:stop],
        )
