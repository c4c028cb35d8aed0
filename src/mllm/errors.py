"""Errors a user can cause, each carrying the exit code the CLI ends with.

The CLI turns these into one line on stderr (no traceback unless --debug): exit code 2 for a bad
flag or config value, 1 for everything else a user can fix (a missing or mismatched file, an
unreachable hub, a full disk).
"""

from __future__ import annotations


class MllmError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code = 1


class UsageError(MllmError):
    """A bad flag or config value (exit code 2, like a command-line parse error)."""

    exit_code = 2


def parse_error_line(error: BaseException) -> str:
    """A YAML / TOML parser's error as one line, with where it is when the parser knows."""
    mark = getattr(error, "problem_mark", None)  # YAML errors know where they are
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    message = str(getattr(error, "problem", None) or error).strip().splitlines()
    return where + (message[0] if message else type(error).__name__)


def first_line(error: BaseException) -> str:
    """An error's first sentence, for a one-line message about a library's exception (torch's
    zip reader, for one, appends a paragraph of advice)."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__
