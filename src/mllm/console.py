"""Where output goes: rich consoles on stderr for humans, progress bars that stay quiet off a TTY.

stdout is kept for a command's data (generated text, `--json` results) so that it pipes cleanly;
everything for people (progress, tables, warnings) goes to stderr.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

err_console = Console(stderr=True, highlight=False)

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence progress bars and informational messages (errors still print)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def info(message: str) -> None:
    """A line for people on stderr, unless --quiet."""
    if not _quiet:
        err_console.print(message)


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet, since it may change what a result means."""
    err_console.print(f"[yellow]warning:[/yellow] {message}")


def progress_enabled() -> bool:
    """Progress bars only on an interactive terminal, and never with --quiet."""
    return not _quiet and sys.stderr.isatty()


def make_progress(*, bytes_rate: bool = False) -> Progress:
    """A rich progress bar with rate and ETA, disabled off a TTY or with --quiet.

    `bytes_rate` shows the rate as bytes/s (for totals in bytes); otherwise counts with M/N.
    """
    rate = TransferSpeedColumn() if bytes_rate else MofNCompleteColumn()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        rate,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not progress_enabled(),
        transient=False,
    )
