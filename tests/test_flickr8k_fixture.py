"""The real Flickr8k caption files, in both common formats (skipped when the fixtures are absent:
a fresh clone does not have them)."""

from __future__ import annotations

from collections import Counter

import pytest
from flickr8k_fixture import FLICKR8K

from captioner.corpus import Corpus
from captioner.corpus_stats import corpus_stats
from captioner.readers import read_corpus

pytestmark = pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"{FLICKR8K} is absent")

MALFORMED_KEY = "2258277193_586949ec62.jpg.1"
ITS_IMAGE = "2258277193_586949ec62.jpg"  # has 4 good captions in the token file


@pytest.fixture(scope="module")
def token() -> Corpus:
    return read_corpus([FLICKR8K / "Flickr8k.token.txt"])


@pytest.fixture(scope="module")
def kaggle() -> Corpus:
    return read_corpus([FLICKR8K / "captions.txt"])


def captions_by_path(corpus: Corpus) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for caption in corpus.captions:
        grouped.setdefault(corpus.images[caption.image].path, []).append(caption.raw)
    return grouped


def test_token_file_true_counts_and_the_malformed_key(token: Corpus) -> None:
    assert token.format == "flickr8k"
    assert len(token.images) == 8092
    assert len(token.captions) == 40459  # 8091 images x 5 + 4
    assert [(s.line, s.reason) for s in token.skipped] == [(6731, "malformed image key")]
    paths = {image.path for image in token.images}
    assert MALFORMED_KEY not in paths
    assert len(captions_by_path(token)[ITS_IMAGE]) == 4


def test_kaggle_file_true_counts(kaggle: Corpus) -> None:
    assert kaggle.format == "kaggle"
    assert len(kaggle.images) == 8091
    assert len(kaggle.captions) == 40455
    assert set(Counter(c.image for c in kaggle.captions).values()) == {5}
    assert kaggle.skipped == []


def test_standard_split_is_6000_1000_1000(token: Corpus, kaggle: Corpus) -> None:
    assert Counter(i.split for i in token.images) == {
        "train": 6000,
        "val": 1000,
        "test": 1000,
        "unassigned": 92,
    }
    assert Counter(i.split for i in kaggle.images) == {
        "train": 6000,
        "val": 1000,
        "test": 1000,
        "unassigned": 91,
    }
    listed = (FLICKR8K / "Flickr_8k.testImages.txt").read_text().split()
    split_of = {image.path: image.split for image in token.images}
    assert {split_of[name] for name in listed} == {"test"}


def test_the_two_formats_agree_on_the_images_they_share(token: Corpus, kaggle: Corpus) -> None:
    by_token, by_kaggle = captions_by_path(token), captions_by_path(kaggle)
    assert set(by_token) - set(by_kaggle) == {ITS_IMAGE}  # Kaggle dropped the damaged image
    assert set(by_kaggle) <= set(by_token)
    split_of = {image.path: image.split for image in token.images}
    assert all(split_of[image.path] == image.split for image in kaggle.images)
    assert all(len(by_kaggle[path]) == len(by_token[path]) for path in by_kaggle)
    # Kaggle's copy fixes a few typos ("aross" -> "across"); everything else is identical.
    differing = sum(
        a != b for path in by_kaggle for a, b in zip(by_kaggle[path], by_token[path], strict=True)
    )
    assert differing < 0.001 * len(kaggle.captions)


def test_statistics_with_the_real_images(token: Corpus) -> None:
    stats = corpus_stats(token, min_count=5, images_dir=FLICKR8K / "images")
    on_disk = len(list((FLICKR8K / "images").glob("*.jpg")))
    assert stats.missing is not None
    assert stats.missing.images == 8092 - on_disk
    assert stats.captions_per_image == {"min": 4, "mean": 5.0, "max": 5}
    assert stats.skipped_by_reason == {"malformed image key": 1}
    assert 2000 < stats.vocab_size < 4000
    assert stats.caption_length["p50"] <= stats.caption_length["p90"] <= stats.caption_length["max"]
