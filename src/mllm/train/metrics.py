"""What a training run reports: metrics.jsonl, the live display, and loss.png.

metrics.jsonl holds one JSON object per line, flushed as written, so it can be tailed or read
while the run goes on:

- a training record every --log-interval steps (and at the last step):
  `{"step", "loss", "lr", "tokens", "tokens_per_s", "mfu", "grad_norm", "elapsed", "cold"}`,
  where `loss` is that step's raw training loss (mean over micro-batches and ranks), `tokens`
  the tokens trained on so far, `tokens_per_s` and `mfu` the throughput of the steps since the
  previous record (step time only: evaluation and checkpoint time excluded), `elapsed` the
  run's wall-clock seconds (across resumes) and `cold` true when the interval holds this
  process's first step (torch.compile compiles there, caches warm up: not a steady-state speed);
- a validation record every --eval-interval steps and at the end: `{"step", "val_loss",
  "tokens", "elapsed"}`.

On resume the records after the checkpoint's step (written by the run that was stopped) are
dropped first, so the file reads as one uninterrupted run.

Every record written also goes to the run's experiment trackers (--tracker, train/trackers.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rich.progress import BarColumn, Progress, TaskID, TextColumn

from mllm.console import err_console, info, is_quiet, progress_enabled
from mllm.fileio import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from mllm.train.trackers import Trackers


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, stopping at the first line that does not parse (the tail a
    killed writer may leave)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(record, dict) or "step" not in record:
            break
        records.append(record)
    return records


class MetricsLog:
    """Appends records to metrics.jsonl and hands them to the trackers (a no-op writer on ranks
    other than 0, which have no trackers)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []  # everything in the file, for loss.png
        self._file: IO[str] | None = None
        self.trackers: Trackers | None = None

    def open(self, resume_step: int | None, trackers: Trackers | None = None) -> None:
        """Start a fresh file (a new run) or keep the records up to `resume_step` (a resume);
        `trackers` get every record written from now on, and are closed by `close()`."""
        if not self.enabled:
            return
        self.trackers = trackers
        kept = (
            []
            if resume_step is None
            else [record for record in read_records(self.path) if record["step"] <= resume_step]
        )
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        self.records = kept
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.records.append(record)
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


def plot_losses(path: Path, records: list[dict[str, Any]]) -> None:
    """loss.png: training and validation loss against tokens seen, written atomically.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so it
    works on a machine without a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train, strict=True), label="train", linewidth=1, alpha=0.8)
    if val:
        axes.plot(*zip(*val, strict=True), label="val", marker="o", markersize=3)
    axes.xaxis.set_major_formatter(EngFormatter())  # 2M, not 2000000
    axes.set_xlabel("tokens")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    if train or val:
        axes.legend()
    figure.subplots_adjust(left=0.11, right=0.97, top=0.96, bottom=0.12)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def format_duration(seconds: float) -> str:
    """H:MM:SS (or M:SS under an hour)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def compact_count(value: float) -> str:
    """5432 -> 5.4k, 1234567 -> 1.2M: rates that fit an 80-column line."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


def metrics_text(record: dict[str, Any], eta_seconds: float) -> str:
    """loss, lr, tokens/s, MFU and ETA of a training record, short enough for 80 columns."""
    return (
        f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
        f"{compact_count(record['tokens_per_s'])} tok/s  MFU {record['mfu']:.1%}  "
        f"ETA {format_duration(eta_seconds)}"
    )


class TrainDisplay:
    """Progress for people, on stderr: a live rich bar (step, loss, lr, tokens/s, MFU, ETA) on a
    TTY; one plain line per log interval elsewhere; nothing with --quiet or on ranks other than 0.
    """

    def __init__(self, total_steps: int | None, enabled: bool = True) -> None:
        self.total_steps = total_steps
        self.live = enabled and progress_enabled()
        self.plain = enabled and not self.live and not is_quiet()
        self._progress = (
            Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(bar_width=12),
                TextColumn("{task.description}"),
                console=err_console,
            )
            if self.live
            else None
        )
        self._task: TaskID | None = None

    @contextlib.contextmanager
    def running(self, start_step: int) -> Iterator[TrainDisplay]:
        """Show the live bar (from `start_step`) for the duration of the block."""
        if self._progress is None:
            yield self
            return
        with self._progress:
            self._task = self._progress.add_task(
                "starting…", total=self.total_steps, completed=start_step
            )
            yield self

    def set_total(self, total_steps: int) -> None:
        """The run's length once known (a --time-budget run plans it after its first steps)."""
        self.total_steps = total_steps
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=total_steps)

    def step_done(self, step: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step)

    def show(self, record: dict[str, Any], eta_seconds: float) -> None:
        """Put a training record on screen: in the bar's text, or as a plain line."""
        text = metrics_text(record, eta_seconds)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)
        elif self.plain:
            total = "?" if self.total_steps is None else self.total_steps
            info(f"step {record['step']}/{total}  {text}")

    def note(self, message: str) -> None:
        """An event line (evaluation, checkpoint), printed above the bar on a TTY."""
        info(message)
