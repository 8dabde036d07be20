"""The real Flickr8k caption files in ../shared/fixtures/flickr8k, next to the repository. A fresh
clone does not have them, so the tests that read them skip."""

from __future__ import annotations

from pathlib import Path

import pytest

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "flickr8k"


def flickr8k_test_captions(images: int) -> dict[str, list[str]]:
    """The first `images` images of the Flickr8k test split, in split-file order, each with its
    five captions from Flickr8k.token.txt (list index = caption number #0-#4). Skips the calling
    test when the fixtures are absent."""
    if not (FLICKR8K / "Flickr8k.token.txt").is_file():
        pytest.skip("Flickr8k fixtures not present")
    test_images = (FLICKR8K / "Flickr_8k.testImages.txt").read_text().split()[:images]
    wanted = set(test_images)
    captions: dict[str, dict[int, str]] = {}
    for line in (FLICKR8K / "Flickr8k.token.txt").read_text("utf-8").splitlines():
        key, _, text = line.partition("\t")
        image, _, number = key.partition("#")
        if image in wanted:
            captions.setdefault(image, {})[int(number)] = text
    return {image: [captions[image][n] for n in range(5)] for image in test_images}
