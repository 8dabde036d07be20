"""Users' own captions: a CSV or TSV file with a header naming the columns `image`, `caption`
and optionally `split`, in any order, one caption per row.

CSV follows the usual quoting rules (a caption with a comma is quoted). TSV is read without
quoting, so a caption may contain quote characters. When the caption is the last column,
fields beyond it are joined back into the caption: an unquoted comma loses nothing.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from captioner.errors import CaptionerError
from captioner.readers.builder import CorpusBuilder, is_image_name, split_name
from captioner.readers.source import Source

FORMAT = "csv"
COLUMNS = ("image", "caption", "split")


def parse_header(line: str) -> tuple[str, list[str]] | None:
    """(delimiter, column names) when `line` is a valid header, else None."""
    delimiter = "\t" if "\t" in line else ","
    columns = [name.strip().lower() for name in line.split(delimiter)]
    known = {"image", "caption"} <= set(columns) <= set(COLUMNS)
    return (delimiter, columns) if known and len(set(columns)) == len(columns) else None


def looks_like(source: Source) -> bool:
    return parse_header(source.first_line()[1]) is not None


def read(source: Source, builder: CorpusBuilder) -> None:
    number, line = source.first_line()
    header = parse_header(line)
    if header is None:
        raise CaptionerError(
            f"{source.path}:{number}: expected a header naming the columns image, caption and "
            f"optionally split (comma- or tab-separated), found {line[:80]!r}"
        )
    read_table_rows(source, builder, *header)


def read_table_rows(
    source: Source, builder: CorpusBuilder, delimiter: str, columns: list[str]
) -> None:
    """Every row after the header (the first non-blank line) into `builder`."""
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(source.text, newline=""), delimiter=delimiter, quoting=quoting)
    caption_last = columns[-1] == "caption"
    header_seen = False
    for row in _rows(reader, source):
        if not any(field.strip() for field in row):
            continue
        if not header_seen:
            header_seen = True
            continue
        number = reader.line_num
        if caption_last and len(row) > len(columns):
            row = [*row[: len(columns) - 1], delimiter.join(row[len(columns) - 1 :])]
        if len(row) != len(columns):
            builder.skip(source.path, number, f"expected {len(columns)} fields")
            continue
        fields = dict(zip(columns, row, strict=True))
        image = fields["image"].strip()
        if not is_image_name(image):
            builder.skip(source.path, number, "not an image file name")
            continue
        split = None
        if fields.get("split", "").strip():
            split = split_name(fields["split"])
            if split is None:
                builder.skip(source.path, number, "unknown split name")
                continue
        builder.add_captioned_image(image, fields["caption"], source.path, number, split)


def _rows(reader, source: Source) -> Iterator[list[str]]:
    """The reader's rows; a row csv cannot split (a field over its 128 KB limit, a stray quote
    at the end of the file) is a one-line error naming the line."""
    try:
        yield from reader
    except csv.Error as error:
        raise CaptionerError(f"{source.path}:{reader.line_num}: {error}") from None
