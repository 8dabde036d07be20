"""Kaggle's Flickr8k `captions.txt`: CSV with the header `image,caption`, one caption per row,
captions with commas quoted. It carries no split."""

from __future__ import annotations

from captioner.errors import CaptionerError
from captioner.readers.builder import CorpusBuilder
from captioner.readers.source import Source
from captioner.readers.table import read_table_rows

FORMAT = "kaggle"
HEADER = "image,caption"


def looks_like(source: Source) -> bool:
    return source.first_line()[1].strip().lower() == HEADER


def read(source: Source, builder: CorpusBuilder) -> None:
    number, line = source.first_line()
    if line.strip().lower() != HEADER:
        raise CaptionerError(
            f"{source.path}:{number}: expected the header {HEADER!r}, found {line[:80]!r}"
        )
    read_table_rows(source, builder, ",", ["image", "caption"])
