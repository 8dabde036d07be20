"""Stopping cleanly when a scheduler preempts a job or a person presses Ctrl-C.

Schedulers send SIGTERM some time before they kill. Inside `StopRequest`, the first SIGTERM or
SIGINT only raises a flag that long work checks between units (a training step, an extraction
shard, a captioning batch): the unit in hand finishes, what is done is saved, and the command
exits 0 saying how to resume. A second signal acts at once, as it would without this, except a
SIGTERM repeated within a few seconds: under SLURM both the scheduler and torchrun forward the
same notice to every rank.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEATED_NOTICE_SECONDS = 5.0  # a SIGTERM again within this is the same notice, not a second one


class StopRequest:
    """A context in which SIGTERM and SIGINT ask long work to stop at its next safe point."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # where handlers can be set
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        self._restore()

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._received_at = number, now
            return
        if number == signal.SIGTERM == self.signal and now - self._received_at < (
            REPEATED_NOTICE_SECONDS
        ):
            return
        self._restore()  # a second signal acts at once, as it would have without us
        signal.raise_signal(number)

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for number, handler in previous.items():
            if handler is not None:  # (None: a handler set outside Python; leave ours then)
                signal.signal(number, handler)
