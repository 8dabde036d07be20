"""Writing files whole or not at all, and saying where a write failed in the user's words.

Every file the toolkit writes for a later run to read (checkpoints, metrics, results, figures,
the generated dataset) goes through `atomic_file`, so a run killed, or stopped by a full disk,
while writing leaves the previous file as it was, never half of a new one. What a failed write
says names the path the user gave, never the temporary name it was being written under
(`named_after`), and commands check that they can write their output before any long work
(`require_writable_folder`, `require_writable_file`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from captioner.errors import CaptionerError


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
        with named_after(path, temporary):
            with open(temporary, mode, **options) as file:
                yield file
                if durable:
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """The sha256 of the file's bytes, in hex."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_json(path: Path, data: object) -> None:
    """`data` as indented UTF-8 JSON in `path`, written whole or not at all."""
    with atomic_file(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, ensure_ascii=False)


@contextlib.contextmanager
def named_after(path: Path, temporary: Path) -> Iterator[None]:
    """OSErrors raised in the block name `path`, the file or folder the user asked for, where
    they would name `temporary` (what it is written under until it is whole), something inside
    it, or nothing at all (a write to a full disk names no file)."""
    try:
        yield
    except OSError as error:
        if error.errno is None or not _names_nothing_or_inside(error, Path(temporary)):
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error


def _names_nothing_or_inside(error: OSError, folder: Path) -> bool:
    if error.filename is None:
        return True
    if not isinstance(error.filename, str | bytes):
        return False  # a file descriptor
    named = Path(os.fsdecode(error.filename))
    return named == folder or folder in named.parents


def require_writable_folder(folder: Path) -> None:
    """CaptionerError naming `folder` unless a file can be made in it, or, where it does not exist
    yet, in the nearest folder above it that does (where it would be made). Commands check their
    outputs so before any long work, so that an output that cannot be written is said at once,
    not after hours; nothing is left behind by the check."""
    _require_writable(Path(folder), Path(folder))


def require_writable_file(path: Path) -> None:
    """`require_writable_folder` for the file `path` (its folder), which must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise CaptionerError(f"{path}: is a folder; name a file to write")
    _require_writable(path, path.parent)


def _require_writable(target: Path, folder: Path) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == target and not existing.is_dir():
        raise CaptionerError(f"{target}: is a file; name a folder")
    if not existing.is_dir():
        raise CaptionerError(f"{target}: cannot be made: {existing} is a file, not a folder")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".captioner-write-check-", dir=existing)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise CaptionerError(
            f"{target}: cannot write in {existing} ({error.strerror}); choose another place, or"
            " let this user write there"
        ) from None


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
