"""`mllm tokenize`: a byte-level BPE tokenizer trained on corpus.txt, and the helpers to load it.

The tokenizer is HF `tokenizers` byte-level BPE with nothing that could change the text on its
way in or out, so `decode(encode(text)) == text` for every Unicode string:
- no normalizer (NFC and friends would rewrite text);
- the ByteLevel pre-tokenizer with `add_prefix_space=False` (nothing is added) and the ByteLevel
  decoder; no post-processor (nothing is appended), so offsets trimming never matters;
- the full 256-byte initial alphabet, so every byte has a token and nothing is ever unknown;
- one special token, `<|endoftext|>`, which `mllm pack` writes after every document.

The literal text "<|endoftext|>" inside a document is *text*: `load_tokenizer` turns on
`encode_special_tokens`, so it encodes to ordinary byte-level tokens and only pack's separators
are EOT ids. (`tokenizers` does not save that switch in tokenizer.json, so always load with
`load_tokenizer`; a bare `Tokenizer.from_file` would map the literal to the EOT id.)

Training streams corpus.txt in blocks of lines into `train_from_iterator`: memory grows with the
number of *distinct* words the BPE trainer counts, not with the corpus size (`--max-bytes` caps
how much is read; a few hundred MB is plenty for a 16k vocabulary).
"""

from __future__ import annotations

import datetime
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.markup import escape
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mllm import __version__
from mllm.config import TokenizeConfig
from mllm.console import info, make_progress
from mllm.data.datadir import corpus_path, tokenizer_path
from mllm.data.textfile import decode_block, iter_line_blocks, require_corpus, split_documents
from mllm.errors import MllmError
from mllm.fileio import atomic_write_bytes, atomic_write_json, ensure_writable_dir, sha256_file

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT]
BYTE_ALPHABET_SIZE = 256
META_SUFFIX = ".meta.json"  # tokenizer.json -> tokenizer.meta.json: what it was trained on


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json, or raise one clear MllmError for a missing file or a non-tokenizer.

    Turns on `encode_special_tokens`, so a literal "<|endoftext|>" in text is encoded as text.
    """
    return tokenizer_from_bytes(read_tokenizer_file(path), path)


def read_tokenizer_file(path: str | Path) -> bytes:
    """tokenizer.json's bytes, or one clear MllmError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise MllmError(f"tokenizer {what}: {path} (run `mllm tokenize` first)")
    try:
        return path.read_bytes()
    except OSError as e:
        raise MllmError(f"cannot read tokenizer {path}: {e.strerror or e}") from None


def tokenizer_from_bytes(data: bytes, source: str | Path) -> Tokenizer:
    """A tokenizer from tokenizer.json's bytes (as `load_tokenizer`), naming `source` on error."""
    try:
        tokenizer = Tokenizer.from_buffer(data)
    except Exception as e:  # tokenizers raises plain Exception for anything it cannot parse
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MllmError(
            f"{source} is not a tokenizers tokenizer.json ({reason}): re-run `mllm tokenize`"
        ) from None
    tokenizer.encode_special_tokens = True
    return tokenizer


def eot_id(tokenizer: Tokenizer) -> int:
    """Id of `<|endoftext|>`, or one clear MllmError if the tokenizer lacks it."""
    token_id = tokenizer.token_to_id(EOT)
    if token_id is None:
        raise MllmError(f"the tokenizer has no {EOT} token: train one with `mllm tokenize`")
    return token_id


def tokenizer_sha256(path: str | Path) -> str:
    """sha256 of tokenizer.json's bytes: data.json and checkpoints name the tokenizer by it."""
    return sha256_file(path)


def new_byte_level_bpe() -> Tokenizer:
    """An untrained tokenizer with the pipeline described in this module's docstring."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def tokenizer_paths(config: TokenizeConfig) -> tuple[Path, Path]:
    """corpus.txt to read and tokenizer.json to write."""
    corpus = config.corpus or corpus_path(config.data_dir)
    output = config.output or tokenizer_path(config.data_dir)
    return corpus, output


class _CorpusReader:
    """Streams the corpus's documents in batches, counting what it read (for the sidecar)."""

    def __init__(
        self,
        path: Path,
        max_bytes: int | None,
        on_bytes: Callable[[int], object],
        on_done: Callable[[], object],
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.on_bytes = on_bytes
        self.on_done = on_done
        self.bytes_read = 0
        self.lines_read = 0
        self.documents = 0

    def batches(self) -> Iterator[list[str]]:
        for block in iter_line_blocks(self.path, max_bytes=self.max_bytes):
            documents = split_documents(decode_block(block, self.path, self.lines_read))
            self.bytes_read += len(block)
            self.lines_read += block.count(b"\n")
            self.documents += len(documents)
            self.on_bytes(len(block))
            if documents:
                yield [piece for document in documents for piece in word_aligned_pieces(document)]
        self.on_done()


PIECE_CHARS = 1 << 16
# Where the byte-level pre-tokenizer always starts a new word: a space before a non-space.
WORD_START = re.compile(r" (?=\S)")


def word_aligned_pieces(document: str, limit: int = PIECE_CHARS) -> list[str]:
    """A document cut into pieces of about `limit` characters, each cut just before a space that
    starts a word. The trainer then counts exactly the same words, but never holds one huge
    document at once: a 15 MB single-line corpus peaked at 1.5 GB without this."""
    if len(document) <= limit:
        return [document]
    pieces, start = [], 0
    while len(document) - start > limit:
        cut = WORD_START.search(document, start + limit)  # the first word start past the limit
        if cut is None:
            break
        pieces.append(document[start : cut.start()])
        start = cut.start()
    pieces.append(document[start:])
    return pieces


def train_tokenizer(config: TokenizeConfig) -> dict[str, Any]:
    """Train the tokenizer `config` asks for, write it (and its sidecar) atomically; return the
    sidecar's content."""
    started = time.perf_counter()
    corpus, output = tokenizer_paths(config)
    size = require_corpus(corpus, "run `mllm corpus` first, or pass --corpus")
    ensure_writable_dir(output.parent)
    to_read = size if config.max_bytes is None else min(size, config.max_bytes)

    tokenizer = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with make_progress(bytes_rate=True) as progress:
        task = progress.add_task(f"counting words in {corpus.name}", total=to_read)
        reader = _CorpusReader(
            corpus,
            config.max_bytes,
            on_bytes=lambda n: progress.advance(task, n),
            on_done=lambda: progress.update(task, description="learning the merges"),
        )
        tokenizer.train_from_iterator(reader.batches(), trainer=trainer)
        progress.update(task, description="learned the merges")
    if reader.documents == 0:
        if config.max_bytes is not None and reader.bytes_read < size:
            raise MllmError(
                f"no whole line of {corpus} fits in --max-bytes {config.max_bytes}: raise it"
            )
        raise MllmError(f"corpus has no documents (only empty lines): {corpus}")
    _check_vocab(tokenizer, config)

    data = tokenizer.to_str(pretty=True).encode("utf-8")
    atomic_write_bytes(output, data)
    meta = {
        "tokenizer": output.name,
        "sha256": hashlib.sha256(data).hexdigest(),  # = tokenizer_sha256(output)
        "vocab_size": tokenizer.get_vocab_size(),
        "eot_id": eot_id(tokenizer),
        "corpus": str(corpus),
        "corpus_bytes": size,
        "bytes_read": reader.bytes_read,
        "documents_read": reader.documents,
        "config": config.model_dump(mode="json"),
        "mllm_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(output.with_name(output.stem + META_SUFFIX), meta)
    message = (
        f"wrote {output} (vocab {meta['vocab_size']:,}, trained on {reader.documents:,} "
        f"documents, {reader.bytes_read / 1e6:,.1f} MB, in {meta['seconds']:.1f}s)"
    )
    info(escape(message))
    return meta


def _check_vocab(tokenizer: Tokenizer, config: TokenizeConfig) -> None:
    """Refuse a vocabulary smaller than asked for (the corpus ran out of pairs to merge)."""
    got = tokenizer.get_vocab_size()
    if got != config.vocab_size:
        lower = " a lower --min-frequency," if config.min_frequency > 1 else ""
        raise MllmError(
            f"the corpus supports only {got:,} tokens at --min-frequency {config.min_frequency} "
            f"(asked for --vocab-size {config.vocab_size:,}): use --vocab-size {got} or less,"
            f"{lower} or more text"
        )
    missing = set(pre_tokenizers.ByteLevel.alphabet()) - set(tokenizer.get_vocab())
    if missing:  # cannot happen with initial_alphabet; a check, since decoding depends on it
        raise MllmError(f"internal error: {len(missing)} bytes have no token")
