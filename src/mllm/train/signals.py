"""SIGINT / SIGTERM end a training run cleanly: after the current step, with a checkpoint."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopOnSignal:
    """SIGINT and SIGTERM ask the loop to stop: it saves a checkpoint after the current step (one
    process) or at the next boundary (torchrun: ranks agree there) and exits with 128 + the signal
    number. A second signal gets the usual handling (stops at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        previous = self._previous.get(signum)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
