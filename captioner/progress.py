"""Progress of long work, shown as its reader sees it: every progress display goes through here.

On a terminal a phase is a tqdm bar, redrawn in place. Elsewhere (a batch scheduler's log file, a
pipe) a bar's carriage returns would make one unreadable line of hundreds of frames, so a phase
writes a plain line once `interval` seconds have passed since the process's last one (or since
it started, imports included), and one at its end, with the count, the rate and the time left,
and never a carriage return. A phase that ends in an error leaves the error's one line to say
so, and one quicker than a second says nothing.

The library shows progress only when asked: its functions take `progress`, where False shows
nothing, True shows it with the defaults, and a `Progress` says how.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TextIO, TypeVar

from tqdm import tqdm

DEFAULT_INTERVAL = 30.0  # seconds between two plain lines of one phase
# A phase quicker than this (seconds) ends without a plain line: it leaves no silence to fill, and
# a command refused after such phases still says only its one line.
QUICK_PHASE = 1.0
_now = time.monotonic  # (the clock the plain lines are timed by)


def _process_start() -> float:
    """When this process started, on `_now`'s clock (Linux: from /proc; elsewhere, now)."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # (after the command's name)
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # (field 22: since boot)
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, AttributeError, ValueError, IndexError):
        return _now()
    return _now() - max(age, 0.0)


# When this process last wrote a plain line (at first: when it started, so that the interpreter's
# start and the imports count towards the first line). The next line is due one interval after
# it, whichever phase wrote it, so that work between phases does not add to a log's silence.
_last_line_at = _process_start()

Item = TypeVar("Item")


@dataclass(frozen=True)
class Progress:
    """How progress is shown: on `stream` (None: sys.stderr as it is when a phase starts), as bars
    where that is a terminal, else as a plain line every `interval` seconds and at each end."""

    interval: float = DEFAULT_INTERVAL
    stream: TextIO | None = None


ShowProgress = bool | Progress  # what a library function's `progress` parameter takes


def bar(
    progress: ShowProgress,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    leave: bool = True,
    unit_scale: bool = False,
) -> tqdm | PlainProgress:
    """The display of one phase of `total` units: use it as tqdm (`update`, `set_postfix`, a
    context manager that closes it). `leave` and `unit_scale` are tqdm's, for the bar."""
    if progress is False:
        return tqdm(total=total, disable=True)
    shown = Progress() if progress is True else progress
    stream = shown.stream or sys.stderr
    if _is_terminal(stream):
        return tqdm(
            total=total, desc=desc, unit=unit, leave=leave, file=stream, unit_scale=unit_scale
        )
    return PlainProgress(desc, total, unit, shown.interval, stream)


def tracked(
    items: Iterable[Item],
    progress: ShowProgress,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    leave: bool = True,
) -> Iterator[Item]:
    """`items`, counted one by one on the display of a phase (`total`: their number, when `items`
    has no len)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(progress, desc, total, unit, leave) as display:
        for item in items:
            yield item
            display.update()


def write(text: str, file: TextIO | None = None) -> None:
    """Print a line of text on `file` (None: stdout) without breaking a bar on the terminal."""
    tqdm.write(text, file=file)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class PlainProgress:
    """A phase as plain lines: `desc: 1200/5000 img (24%), 40.0 img/s, 1:35 left` at most every
    `interval` seconds while it runs, and `desc: 5000/5000 img in 2:05, 40.0 img/s` at its end
    (unless it was quick)."""

    def __init__(self, desc: str, total: int | None, unit: str, interval: float, stream: TextIO):
        self.desc, self.total, self.unit = desc, total, unit
        self.interval, self.stream = interval, stream
        self.n, self.postfix, self.closed, self.lines = 0, "", False, 0
        self.started = _now()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = _now()
        # (not in a phase's first second: a quick phase writes nothing, as its close says)
        if now - self.started >= QUICK_PHASE and now - _last_line_at >= self.interval:
            self._line(self._running(now - self.started))

    def set_postfix(self, **values: object) -> None:
        """Values shown after the rate on the following lines (`loss=2.31`)."""
        self.postfix = ", ".join(f"{name}={value}" for name, value in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            elapsed = _now() - self.started
            if self.lines or elapsed >= QUICK_PHASE:
                self._line(f"{self._count()} in {_duration(elapsed)}, {self._rate(elapsed)}")

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:  # the error that ended the phase is all there is to say: no end line before it
            self.closed = True

    def _running(self, elapsed: float) -> str:
        if not self.total:
            return f"{self._count()}, {self._rate(elapsed)}"
        share = f"{100 * self.n / self.total:.0f}%"
        rate = self.n / elapsed if elapsed > 0 else 0.0
        left = _duration((self.total - self.n) / rate) if rate > 0 else "?"
        return f"{self._count()} ({share}), {self._rate(elapsed)}, {left} left"

    def _count(self) -> str:
        return f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"

    def _rate(self, elapsed: float) -> str:
        rate = self.n / elapsed if elapsed > 0 else 0.0
        return f"{rate:.1f} {self.unit}/s" if rate < 100 else f"{rate:.0f} {self.unit}/s"

    def _line(self, text: str) -> None:
        global _last_line_at
        postfix = f", {self.postfix}" if self.postfix else ""
        self.stream.write(f"{self.desc}: {text}{postfix}\n")
        self.stream.flush()
        self.lines += 1
        _last_line_at = _now()


def _duration(seconds: float) -> str:
    """1:05 for 65 s, 2:01:05 for 7265 s."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
