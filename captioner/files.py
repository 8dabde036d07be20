"""Writing files whole or not at all.

Every file the toolkit writes for a later run to read (checkpoints, metrics, results, figures,
the generated dataset) goes through `atomic_file`, so a run killed, or stopped by a full disk,
while writing leaves the previous file as it was, never half of a new one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", durable: bool = False, **options) -> Iterator[IO]:
    """A file opened with `mode` (and `options`, e.g. encoding) that replaces `path` when the
    block ends: it is written beside `path` under a temporary name, then renamed over it. On an
    error the temporary file goes and `path` is untouched. `durable` also flushes the data to the
    disk before the rename (for checkpoints, whose loss would cost hours)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, mode, **options) as file:
            yield file
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
