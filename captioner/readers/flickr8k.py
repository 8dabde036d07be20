"""The original Flickr8k `Flickr8k.token.txt` (Flickr30k's `results_20130124.token` is the same
format): one ``IMAGE.jpg#N<TAB>caption`` line per caption. Splits come from the standard split
files (see splits.py), not from this file.

The real file has a malformed key, ``2258277193_586949ec62.jpg.1#0``: such lines are skipped and
counted, never mapped to a guessed image.
"""

from __future__ import annotations

import re

from captioner.readers.builder import CorpusBuilder, is_image_name
from captioner.readers.source import Source

FORMAT = "flickr8k"
LINE = re.compile(r"(?P<image>[^\t]+)#(?P<number>\d+)\t(?P<caption>.*)")


def looks_like(source: Source) -> bool:
    return LINE.fullmatch(source.first_line()[1]) is not None


def read(source: Source, builder: CorpusBuilder) -> None:
    for number, line in source.lines():
        if not line.strip():
            continue
        match = LINE.fullmatch(line)
        if match is None:
            builder.skip(source.path, number, "not an IMAGE#N<TAB>caption line")
        elif not is_image_name(match["image"]):
            builder.skip(source.path, number, "malformed image key")
        else:
            builder.add_captioned_image(match["image"], match["caption"], source.path, number)
