"""Helpers shared by the tokenize / pack / loader tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


def write_paragraphs(source: Path, target: Path, max_bytes: int) -> list[str]:
    """corpus.txt from real text: one paragraph per line (whitespace runs made one space), at
    least 20 characters each, until about `max_bytes`; returns the documents written."""
    documents: list[str] = []
    size = 0
    for line in source.read_text(encoding="utf-8").splitlines():
        document = " ".join(line.split())
        if len(document) < 20:
            continue
        documents.append(document)
        size += len(document.encode()) + 1
        if size >= max_bytes:
            break
    target.write_text("".join(d + "\n" for d in documents), encoding="utf-8")
    return documents


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's stderr must be exactly one line starting with 'error:'; return it."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    return lines[0]
