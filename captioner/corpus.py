"""The normalized caption corpus that every dataset format is read into.

Row order matters: a feature store's row i holds the features of ``corpus.images[i]``, and
``CaptionRecord.image`` is an index into ``corpus.images``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")
RESTVAL = "restval"  # Karpathy's extra COCO training images, kept apart only when asked
UNASSIGNED = "unassigned"


@dataclass(frozen=True)
class ImageRecord:
    """One image. `id` is the dataset's own id (COCO's integer as text, else the file name);
    `path` is relative to the image root and is the join key with files on disk."""

    id: str
    path: str
    split: str


@dataclass(frozen=True)
class CaptionRecord:
    image: int  # index into Corpus.images
    raw: str
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class SkippedLine:
    """A line of a source file that was not read, and why (reported, never silently dropped)."""

    source: str
    line: int  # 1-based; 0 when the source is JSON, where `item` says where instead
    reason: str  # a fixed phrase, so that skipped lines can be counted by reason
    item: str = ""  # e.g. "annotations[17]" in a JSON file

    def location(self) -> str:
        return f"{self.source} {self.item}" if self.item else f"{self.source}:{self.line}"


@dataclass
class Corpus:
    format: str
    sources: list[str]
    images: list[ImageRecord]
    captions: list[CaptionRecord]
    skipped: list[SkippedLine] = field(default_factory=list)
    split_rule: str = ""  # how the splits were assigned, in words (shown by `captioner inspect`)

    def image_indices(self, split: str) -> list[int]:
        return [i for i, image in enumerate(self.images) if image.split == split]

    def captions_by_image(self) -> list[list[int]]:
        """For each image, the indices of its captions (in file order)."""
        groups: list[list[int]] = [[] for _ in self.images]
        for i, caption in enumerate(self.captions):
            groups[caption.image].append(i)
        return groups

    def references(self, rows: Iterable[int]) -> dict[int, list[CaptionRecord]]:
        """Image row -> its captions (in file order), for the rows given."""
        by_image = self.captions_by_image()
        return {row: [self.captions[c] for c in by_image[row]] for row in rows}

    def tokens_of_split(self, split: str) -> list[tuple[str, ...]]:
        return [c.tokens for c in self.captions if self.images[c.image].split == split]

    def subset(self, image_indices: list[int]) -> Corpus:
        """The corpus restricted to these images (renumbered in the given order)."""
        new_index = {old: new for new, old in enumerate(image_indices)}
        captions = [
            CaptionRecord(new_index[c.image], c.raw, c.tokens)
            for c in self.captions
            if c.image in new_index
        ]
        images = [self.images[i] for i in image_indices]
        return Corpus(
            self.format, self.sources, images, captions, list(self.skipped), self.split_rule
        )
