r"""Documents -> one stream of token ids, `<|endoftext|>` after each: what `mllm pack` writes.

`ReferenceEncoder` is the plain way: `Tokenizer.encode_batch_fast` per document. It spends most
of its time inside `tokenizers` on work that repeats for every occurrence of a word (the
pre-tokenizer's regex and byte-to-char mapping with per-byte alignment bookkeeping, building an
`Encoding` with token strings and offsets), and the BPE model's own word cache keeps only the
first 10,000 words it meets.

`PieceCacheEncoder` gives the same ids (tests compare the two on real and random text) several
times faster, by encoding each distinct *piece* of text once and copying its ids after that.

Why it is exact. BPE never merges across pre-tokens, so a document's ids are the concatenation
of its pre-tokens' ids. The ByteLevel pre-tokenizer splits with the regex

    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+

and always starts a new pre-token at a space followed by a non-space character c: a run of
whitespace before that space stops short of it (`\s+(?!\S)` backtracks until the next character
is a space), no other alternative holds a space except as its first character, and one of
` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+` matches from the space (c is a letter, a digit or
something else). The regex has no look-behind, and the space after a piece satisfies `(?!\S)`
just as the end of the text does, so a piece between two such spaces pre-tokenizes the same on
its own as in context. We cut only at those spaces, testing c with Python's `\s`, which holds
every Unicode White_Space character that Oniguruma's `\s` holds (and U+001C-U+001F too), so we
never cut where the tokenizer would not. A test checks " " + c for every code point c.

Where it applies: to the pipeline `mllm tokenize` builds (no normalizer, the ByteLevel
pre-tokenizer with its regex and no prefix space, BPE without dropout, only special added
tokens, which `load_tokenizer` makes encode as text). Any other tokenizer gets
`ReferenceEncoder`.

New pieces: a piece that is one ASCII word or number is a single pre-token (` ?\p{L}+` or
` ?\p{N}+` matches all of it), so it goes straight to the BPE model (`model.tokenize`, ~2 µs);
any other goes through the whole pipeline (`encode_batch_fast`, ~7 µs).

Memory: the cache holds at most `max_pieces` pieces (then starts afresh), so it is bounded
whatever the corpus size; English text reuses a modest set of pieces (" the", " of", ...).
"""

from __future__ import annotations

import json
import re
from itertools import chain, repeat
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

# A space the tokenizer may not start a pre-token at: one followed by whitespace or the end.
_SPACE_NOT_BEFORE_TEXT = re.compile(r" (?!\S)")
# The spaces we cut at: each is followed by a non-space character (and starts the next piece).
_SPACE_BEFORE_TEXT = re.compile(r" (?=\S)")
# A piece that is exactly one pre-token of ` ?\p{L}+` or ` ?\p{N}+` (ASCII only: safe to map).
_ONE_WORD = re.compile(r" ?(?:[A-Za-z]+|[0-9]+)")
# Cache keys. A document never contains "\n", so keys starting with it cannot clash with pieces:
# "\n" + piece is a document's first piece (encoded as is); any other key k is encoded as " " + k.
_FIRST = "\n"
_EOT_KEY = "\n\n"


class DocumentEncoder(Protocol):
    def encode(self, documents: list[str]) -> np.ndarray:
        """uint32 ids of the documents in order, the EOT id after each one."""
        ...


class ReferenceEncoder:
    """`encode_batch_fast` per document: correct for any tokenizer; the yardstick for the rest."""

    def __init__(self, tokenizer: Tokenizer, eot_id: int) -> None:
        self.tokenizer = tokenizer
        self.eot_id = eot_id

    def encode(self, documents: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch_fast(documents, add_special_tokens=False)
        eot = [self.eot_id]
        ids = chain.from_iterable(chain.from_iterable((e.ids, eot) for e in encodings))
        return np.fromiter(ids, dtype=np.uint32)


class _GrowableArray:
    """A numpy array that appends in amortised O(1) (capacity doubles)."""

    def __init__(self, dtype: type[np.generic]) -> None:
        self.data = np.empty(1024, dtype=dtype)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        end = self.size + len(values)
        if end > len(self.data):
            grown = np.empty(max(end, 2 * len(self.data)), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : end] = values
        self.size = end


class PieceCacheEncoder:
    """Same ids as `ReferenceEncoder`, encoding each distinct piece of text once (see module)."""

    def __init__(self, tokenizer: Tokenizer, eot_id: int, max_pieces: int = 1 << 19) -> None:
        self.tokenizer = tokenizer
        self.eot_id = eot_id
        self.max_pieces = max_pieces
        self._reset()

    def _reset(self) -> None:
        self._index: dict[str, int] = {_EOT_KEY: 0}  # key -> row in _starts/_lengths
        self._ids = _GrowableArray(np.uint32)  # every cached piece's ids, back to back
        self._starts = _GrowableArray(np.int64)
        self._lengths = _GrowableArray(np.int64)
        self._append([[self.eot_id]])

    def _append(self, id_lists: list[list[int]]) -> None:
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        starts = self._ids.size + np.cumsum(lengths) - lengths
        self._ids.extend(np.fromiter(chain.from_iterable(id_lists), dtype=np.uint32))
        self._starts.extend(starts)
        self._lengths.extend(lengths)

    def _learn(self, keys: list[str]) -> None:
        """Encode new keys and add them to the cache."""
        texts = [k[1:] if k[0] == _FIRST else " " + k for k in keys]
        first_row = len(self._index)
        self._index.update(zip(keys, range(first_row, first_row + len(keys)), strict=True))
        self._append(self._encode_pieces(texts))

    def _encode_pieces(self, texts: list[str]) -> list[list[int]]:
        """Each piece's ids. A piece that is one ASCII word or number (62% of new pieces in
        English) is one pre-token, so the BPE model alone encodes it, ~3x faster than the
        whole pipeline; its byte-level form is itself, with "Ġ" for the leading space."""
        ids: list[list[int]] = [[]] * len(texts)
        others: list[int] = []
        tokenize = self.tokenizer.model.tokenize
        for i, text in enumerate(texts):
            if _ONE_WORD.fullmatch(text):
                ids[i] = [token.id for token in tokenize(text.replace(" ", "Ġ"))]
            else:
                others.append(i)
        batch = [texts[i] for i in others]
        for i, encoding in zip(
            others, self.tokenizer.encode_batch_fast(batch, add_special_tokens=False), strict=True
        ):
            ids[i] = encoding.ids
        return ids

    @staticmethod
    def _keys(documents: list[str]) -> list[str]:
        """Every document as its cache keys (pieces), each document followed by the EOT key."""
        keys: list[str] = []
        for document in documents:
            if _SPACE_NOT_BEFORE_TEXT.search(document) is None:
                pieces = document.split(" ")  # every space starts a piece: the fast common case
            else:
                pieces = _SPACE_BEFORE_TEXT.split(document)
            pieces[0] = _FIRST + pieces[0]
            keys += pieces
            keys.append(_EOT_KEY)
        return keys

    def encode(self, documents: list[str]) -> np.ndarray:
        if not documents:
            return np.empty(0, dtype=np.uint32)
        if len(self._index) > self.max_pieces:
            self._reset()
        keys = self._keys(documents)
        rows = np.fromiter(map(self._index.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        unknown = np.flatnonzero(rows < 0)
        if unknown.size:
            new_keys = list(dict.fromkeys(keys[i] for i in unknown.tolist()))
            self._learn(new_keys)
            rows[unknown] = [self._index[keys[i]] for i in unknown.tolist()]
        return self._gather(rows)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """The cached ids of `rows`, concatenated, in one vectorised index."""
        lengths = self._lengths.data[rows]
        ends = np.cumsum(lengths)
        shift = self._starts.data[rows] - (ends - lengths)  # cache position - output position
        positions = np.repeat(shift, lengths) + np.arange(ends[-1], dtype=np.int64)
        return self._ids.data[positions]


def piece_cache_applies(tokenizer: Tokenizer) -> bool:
    """Whether `PieceCacheEncoder` gives exactly the tokenizer's ids (see the module docstring)."""
    spec = json.loads(tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True
        and pre.get("add_prefix_space") is False
        and model.get("type") == "BPE"
        and model.get("dropout") is None
        and all(token.get("special") for token in spec.get("added_tokens") or [])
        and tokenizer.encode_special_tokens
    )


def make_encoder(tokenizer: Tokenizer, eot_id: int) -> DocumentEncoder:
    """The fastest encoder that gives exactly the tokenizer's ids."""
    tokenizer.no_truncation()  # a tokenizer.json may carry these; pack must never cut or pad
    tokenizer.no_padding()
    if piece_cache_applies(tokenizer):
        return PieceCacheEncoder(tokenizer, eot_id)
    return ReferenceEncoder(tokenizer, eot_id)
