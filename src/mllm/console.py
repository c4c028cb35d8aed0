"""Where output goes: rich consoles on stderr for humans, progress bars that stay quiet off a TTY.

stdout is kept for a command's data (generated text, `--json` results) so that it pipes cleanly;
everything for people (progress, tables, warnings) goes to stderr.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

err_console = Console(stderr=True, highlight=False)

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence progress bars and informational messages (errors still print)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def info(message: str) -> None:
    """A line for people on stderr (rich markup allowed), unless --quiet."""
    if not _quiet:
        err_console.print(message, soft_wrap=True)


def essential(message: str) -> None:
    """A line people need even with --quiet (e.g. the address a server listens on), on stderr."""
    err_console.print(message, soft_wrap=True)


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet, since it may change what a result means.

    The message is printed literally (no markup) on one line, however narrow the terminal.
    """
    err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def error(message: str) -> None:
    """The one-line error a failed command ends with (printed literally, never wrapped)."""
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


def progress_enabled() -> bool:
    """Progress bars only on an interactive terminal, and never with --quiet."""
    return not _quiet and sys.stderr.isatty()


class RateColumn(ProgressColumn):
    """Items per second, e.g. "1,234 docs/s" (rich only has a bytes/s column built in)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        shown = "?" if speed is None else f"{speed:,.0f}"
        return Text(f"{shown} {self.unit}/s", style="progress.data.speed")


def make_progress(*, bytes_rate: bool = False, unit: str | None = None) -> Progress:
    """A rich progress bar with rate and ETA, disabled off a TTY or with --quiet.

    `bytes_rate` shows the rate as bytes/s (for totals in bytes); `unit` shows counts as
    "N unit/s" (e.g. unit="docs"); otherwise counts as M/N.
    """
    columns: list[ProgressColumn] = [MofNCompleteColumn()]
    if bytes_rate:
        columns = [TransferSpeedColumn()]
    elif unit:
        columns.append(RateColumn(unit))
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        *columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not progress_enabled(),
        transient=False,
    )
