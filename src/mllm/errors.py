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
