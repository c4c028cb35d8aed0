"""Reading corpus.txt: whole-line blocks of bytes, and the one rule for what a document is.

corpus.txt is UTF-8 with one document per line. `tokenize` and `pack` both stream it in blocks of
whole lines (a few MB each) so memory stays flat however large the file is, and both split a
block into documents with `split_documents`, so they agree on what a document is:

- a line ends at "\\n"; a "\\r" just before it is part of the line ending ("\\r\\n" files work);
- an empty line is not a document (it is skipped, and packs to nothing);
- everything else on a line, byte for byte, is the document (other whitespace included).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mllm.errors import MllmError

BLOCK_BYTES = 1 << 20  # 1 MiB: amortises per-block work; keeps per-block memory small


def require_corpus(path: Path, make_it: str) -> int:
    """The size of corpus.txt in bytes, or one clear MllmError if it is missing or empty.

    `make_it` says how to produce it, e.g. "run `mllm corpus` first".
    """
    if not path.exists():
        raise MllmError(f"corpus not found: {path} ({make_it})")
    if not path.is_file():
        raise MllmError(f"corpus is not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise MllmError(f"corpus is empty: {path} ({make_it})")
    return size


def iter_line_blocks(
    path: Path, block_bytes: int = BLOCK_BYTES, max_bytes: int | None = None
) -> Iterator[bytes]:
    """The file's bytes in blocks of whole lines, in order (the last line may lack its "\\n").

    A line longer than `block_bytes` makes a longer block rather than being cut. With
    `max_bytes`, at most that many bytes are read, in whole lines: a line the cap cuts is dropped.
    """
    remaining = max_bytes
    pending: list[bytes] = []  # the start of a line whose end is not read yet
    with open(path, "rb") as f:
        while True:
            want = block_bytes if remaining is None else min(block_bytes, remaining)
            data = f.read(want) if want > 0 else b""
            if remaining is not None:
                remaining -= len(data)
            if not data:
                capped = remaining is not None and remaining <= 0 and f.read(1) != b""
                if pending and not capped:  # the last line, without its "\n"
                    yield b"".join(pending)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                pending.append(data)
                continue
            yield b"".join([*pending, data[:cut]]) if pending else data[:cut]
            pending = [data[cut:]] if cut < len(data) else []


def decode_block(block: bytes, path: Path, line_offset: int) -> str:
    """A block as text, or one clear MllmError naming the first line that is not UTF-8.

    `line_offset` is the number of lines before this block (for the line number in the message).
    """
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_offset + block.count(b"\n", 0, e.start) + 1
        raise MllmError(
            f"{path} is not UTF-8 text: invalid byte at line {line}; "
            "re-create it with `mllm corpus` or convert it to UTF-8"
        ) from None


def split_documents(text: str) -> list[str]:
    """The documents of a block of whole lines: one per non-empty line, line endings removed."""
    lines = text.split("\n")
    if "\r" in text:
        lines = [line.removesuffix("\r") for line in lines]
    return [line for line in lines if line]
