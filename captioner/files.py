"""Writing files whole or not at all.

Every file the toolkit writes for a later run to read (checkpoints, metrics, results, figures,
the generated dataset) goes through `atomic_file`, so a run killed, or stopped by a full disk,
while writing leaves the previous file as it was, never half of a new one.
"""

from __future__ import annotations

import contextlib
import json
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


def write_json(path: Path, data: object) -> None:
    """`data` as indented UTF-8 JSON in `path`, written whole or not at all."""
    with atomic_file(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, ensure_ascii=False)


# Cells a spreadsheet would run as a formula when a CSV is opened in it.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: str) -> str:
    """`value` prefixed with ' if a spreadsheet would run it as a formula (it then shows the
    text as written); plain numbers such as -12.5 stay numbers."""
    return "'" + value if _is_formula(value) else value


def spreadsheet_value(cell: str) -> str:
    """The value `spreadsheet_safe` wrote into `cell`."""
    return cell[1:] if cell.startswith("'") and _is_formula(cell[1:]) else cell


def _is_formula(value: str) -> bool:
    if not value.startswith(_FORMULA_STARTS):
        return False
    try:
        float(value)
        return False
    except ValueError:
        return True
