"""Collects images and captions, in the order the readers meet them, into one `Corpus`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from captioner.corpus import CaptionRecord, Corpus, ImageRecord, SkippedLine
from captioner.errors import CaptionerError
from captioner.text import tokenize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Split names as they appear in the wild -> ours. "restval" is resolved later (see splits.py).
SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "dev": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "restval": "restval",
}


def is_image_name(name: str) -> bool:
    """Whether `name` ends like an image file. Flickr8k's token file has keys such as
    ``2258277193_586949ec62.jpg.1``: no such file exists, and guessing which one was meant
    would invent an image, so such keys are rejected."""
    return bool(name.strip()) and name.lower().endswith(IMAGE_SUFFIXES)


def split_name(value: str) -> str | None:
    """Our name for a split written as `value`; None when it is not a split we know."""
    return SPLIT_ALIASES.get(value.strip().lower())


class CorpusBuilder:
    def __init__(self, on_caption: Callable[[], object] = lambda: None) -> None:
        """`on_caption` is called at every caption read (to count them on a progress display)."""
        self.on_caption = on_caption
        self.ids: list[str] = []
        self.paths: list[str] = []
        self.splits: list[str | None] = []  # None: the caption file says nothing
        self.captions: list[CaptionRecord] = []
        self.skipped: list[SkippedLine] = []
        self._index: dict[str, int] = {}

    def add_image(self, image_id: str, path: str, split: str | None = None) -> int:
        """The index of this image, added on first sight. A split given later fills a gap."""
        index = self._index.get(image_id)
        if index is None:
            index = len(self.ids)
            self._index[image_id] = index
            self.ids.append(image_id)
            self.paths.append(path)
            self.splits.append(split)
        elif self.splits[index] is None:
            self.splits[index] = split
        return index

    def add_caption(self, image: int, raw: str, source: Path, line: int, item: str = "") -> None:
        tokens = self._tokens(raw, source, line, item)
        if tokens:
            self.captions.append(CaptionRecord(image, raw.strip(), tokens))

    def add_captioned_image(
        self, image_id: str, raw: str, source: Path, line: int, split: str | None = None
    ) -> None:
        """One line of a text format: an image name and its caption (and maybe a split).
        The image is added only if the line holds a caption."""
        tokens = self._tokens(raw, source, line)
        if not tokens:
            return
        known = self._index.get(image_id)
        if known is not None and split and self.splits[known] not in (None, split):
            self.skip(source, line, "image listed with two different splits")
            return
        image = self.add_image(image_id, image_id, split)
        self.captions.append(CaptionRecord(image, raw.strip(), tokens))

    def _tokens(self, raw: str, source: Path, line: int, item: str = "") -> tuple[str, ...]:
        tokens = tuple(tokenize(raw))
        self.on_caption()
        if not tokens:
            self.skip(source, line, "caption has no words", item)
        return tokens

    def skip(self, source: Path, line: int, reason: str, item: str = "") -> None:
        self.skipped.append(SkippedLine(str(source), line, reason, item))

    def build(self, format: str, sources: list[str], splits: list[str], split_rule: str) -> Corpus:
        if not self.captions:
            reasons = sorted({s.reason for s in self.skipped})
            why = f" ({len(self.skipped)} lines skipped: {'; '.join(reasons)})" if reasons else ""
            raise CaptionerError(f"{sources[0]}: no captions found as format {format}{why}")
        images = [ImageRecord(*record) for record in zip(self.ids, self.paths, splits, strict=True)]
        return Corpus(format, sources, images, self.captions, self.skipped, split_rule)
