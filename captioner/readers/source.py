"""A caption file as text: checked to exist, decoded as UTF-8 (a BOM is dropped), not empty.

Every reader starts from a `Source`, so the errors a user causes by pointing at the wrong file
(missing, empty, not UTF-8, broken JSON) read the same whatever the format.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from captioner.errors import CaptionerError


@dataclass
class Source:
    path: Path
    text: str

    @classmethod
    def load(cls, path: Path) -> Source:
        path = Path(path)
        if not path.exists():
            raise CaptionerError(f"{path}: no such file")
        if path.is_dir():
            raise CaptionerError(f"{path}: is a directory, not a caption file")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CaptionerError(f"{path}: cannot read ({error.strerror})") from None
        data = data.removeprefix(codecs.BOM_UTF8)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            raise CaptionerError(
                f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
                "save the file as UTF-8"
            ) from None
        if not text.strip():
            raise CaptionerError(f"{path}: empty file")
        return cls(path, text)

    def lines(self) -> Iterator[tuple[int, str]]:
        """(1-based line number, line without its LF or CRLF ending), blank lines included."""
        for number, line in enumerate(self.text.split("\n"), start=1):
            yield number, line.removesuffix("\r")

    def first_line(self) -> tuple[int, str]:
        """The first line that is not blank (a non-empty file has one)."""
        return next((n, line) for n, line in self.lines() if line.strip())

    @property
    def looks_like_json(self) -> bool:
        return self.text.lstrip().startswith(("{", "["))

    @cached_property
    def json(self) -> Any:
        try:
            return json.loads(self.text)
        except json.JSONDecodeError as error:
            raise CaptionerError(
                f"{self.path}:{error.lineno}: invalid JSON ({error.msg})"
            ) from None


def json_field(
    source: Source, value: Any, key: str, kind: type | tuple[type, ...], where: str
) -> Any:
    """`value[key]`, checked to be of `kind`; a CaptionerError naming the JSON path if not."""
    if not isinstance(value, dict):
        raise CaptionerError(f"{source.path}: {where or 'the top level'} is not a JSON object")
    item = value.get(key)
    if not isinstance(item, kind) or isinstance(item, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        path = f"{where}.{key}" if where else key
        found = "missing" if key not in value else f"a {type(item).__name__}"
        raise CaptionerError(
            f"{source.path}: wrong JSON shape: {path} should be a {names}, it is {found}"
        )
    return item
