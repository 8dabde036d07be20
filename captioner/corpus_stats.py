"""What a user needs to know about a caption corpus before spending GPU hours on it
(computed here; `captioner inspect` only formats it)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from captioner.corpus import Corpus
from captioner.errors import CaptionerError
from captioner.progress import ShowProgress, tracked
from captioner.text import Vocabulary


@dataclass
class MissingImages:
    """Images of the corpus with no file under the image folder, and their captions."""

    images: int
    captions: int
    examples: list[str]


@dataclass
class CorpusStats:
    format: str
    sources: list[str]
    split_rule: str
    images: int
    captions: int
    splits: dict[str, int]  # split -> images
    captions_per_split: dict[str, int]
    captions_per_image: dict[str, float]  # min / mean / max over images that have captions
    images_without_captions: int
    missing: MissingImages | None  # None: no image folder was given
    skipped: int
    skipped_by_reason: dict[str, int]
    skipped_examples: list[str]  # "file:line: reason", the first few
    min_count: int
    vocab_size: int  # train split only, special tokens included
    caption_length: dict[str, int]  # p50 / p90 / p99 / max, in tokens

    def to_dict(self) -> dict:
        return asdict(self)


def corpus_stats(
    corpus: Corpus,
    min_count: int = 5,
    images_dir: Path | None = None,
    examples: int = 3,
    progress: ShowProgress = False,
) -> CorpusStats:
    per_image = np.bincount([c.image for c in corpus.captions], minlength=len(corpus.images))
    captioned = per_image[per_image > 0]
    split_names = [image.split for image in corpus.images]
    lengths = np.array([len(c.tokens) for c in corpus.captions])
    vocabulary = Vocabulary.build(corpus.tokens_of_split("train"), min_count, progress)
    return CorpusStats(
        format=corpus.format,
        sources=list(corpus.sources),
        split_rule=corpus.split_rule,
        images=len(corpus.images),
        captions=len(corpus.captions),
        splits=dict(Counter(split_names)),
        captions_per_split=dict(Counter(split_names[c.image] for c in corpus.captions)),
        captions_per_image={
            "min": int(captioned.min()),
            "mean": round(float(captioned.mean()), 2),
            "max": int(captioned.max()),
        },
        images_without_captions=int((per_image == 0).sum()),
        missing=(
            None if images_dir is None else missing_images(corpus, images_dir, examples, progress)
        ),
        skipped=len(corpus.skipped),
        skipped_by_reason=dict(Counter(s.reason for s in corpus.skipped).most_common()),
        skipped_examples=[f"{s.location()}: {s.reason}" for s in corpus.skipped[:examples]],
        min_count=min_count,
        vocab_size=len(vocabulary),
        caption_length={
            f"p{q}": int(np.percentile(lengths, q, method="higher")) for q in (50, 90, 99)
        }
        | {"max": int(lengths.max())},
    )


def missing_images(
    corpus: Corpus, images_dir: Path, examples: int = 3, progress: ShowProgress = False
) -> MissingImages:
    """Each folder is listed once, so checking 100k images costs a few directory reads."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise CaptionerError(f"{images_dir}: no such image folder")
    listings: dict[str, set[str]] = {}

    def exists(relative: str) -> bool:
        folder, _, name = relative.rpartition("/")
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(images_dir / folder))
            except OSError:
                listings[folder] = set()
        return name in listings[folder]

    images = tracked(corpus.images, progress, "image files", unit="img")
    missing = [i for i, image in enumerate(images) if not exists(image.path)]
    missing_set = set(missing)
    return MissingImages(
        images=len(missing),
        captions=sum(1 for c in corpus.captions if c.image in missing_set),
        examples=[corpus.images[i].path for i in missing[:examples]],
    )
