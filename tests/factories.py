"""Generated test data shared by every test module (feature stores that need no images or CNN),
and the faults the training tests inject.

Import as ``from factories import make_store`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from captioner.corpus import SPLITS, CaptionRecord, Corpus, ImageRecord
from captioner.encoder import EncoderConfig
from captioner.store import FeatureStore, StoreSettings, create_store
from captioner.text import tokenize
from captioner.training.batches import FeatureStream

# Each image belongs to a class (row % 4); its captions name the class's colour and shape, and its
# features lean towards the class's direction, so a decoder can learn something real from them.
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star")
FILLER = ("a", "small", "big", "on", "the", "left", "right", "of", "picture", "with", "near")


def make_corpus(
    images: int = 12,
    captions_per_image: int = 3,
    split_fractions: Sequence[float] = (0.5, 0.25, 0.25),
    seed: int = 0,
) -> Corpus:
    """Images ``img_000.jpg``... split train/val/test in row order by `split_fractions`, each
    with `captions_per_image` captions like "a small red circle on the left"."""
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(split_fractions) / np.sum(split_fractions) * images
    records, captions = [], []
    for row in range(images):
        split = SPLITS[min(int(np.searchsorted(bounds, row, side="right")), len(SPLITS) - 1)]
        name = f"img_{row:03d}.jpg"
        records.append(ImageRecord(name, name, split))
        colour, shape = COLOURS[row % 4], SHAPES[row % 4]
        for _ in range(captions_per_image):
            before = rng.choice(FILLER, size=rng.integers(1, 3)).tolist()
            after = rng.choice(FILLER, size=rng.integers(0, 4)).tolist()
            raw = " ".join([*before, colour, shape, *after]).capitalize() + "."
            captions.append(CaptionRecord(row, raw, tuple(tokenize(raw))))
    return Corpus("generated", ["generated"], records, captions)


def make_store(
    path: Path,
    *,
    images: int = 12,
    captions_per_image: int = 3,
    grid: tuple[int, int] = (2, 2),
    channels: int = 16,
    dtype: str = "float16",
    images_per_shard: int = 4,
    compression: str = "zstd",
    seed: int = 0,
    split_fractions: Sequence[float] = (0.5, 0.25, 0.25),
    failed: Sequence[int] = (),
    weights_checksum: str | None = None,
) -> Path:
    """A complete store of random features for a generated corpus (see `make_corpus`).

    Rows listed in `failed` are marked failed (NaN features), as extraction marks broken images.
    """
    corpus = make_corpus(images, captions_per_image, split_fractions, seed)
    settings = StoreSettings(
        encoder=EncoderConfig("tiny", "none", 32 * grid[0]),
        weights_id="generated",
        weights_checksum=weights_checksum or f"generated-seed-{seed}",
        grid=tuple(grid),
        channels=channels,
        dtype=dtype,
        images_per_shard=images_per_shard,
        compression=compression,
    )
    writer = create_store(Path(path), corpus, settings)
    rng = np.random.default_rng(seed)
    regions = grid[0] * grid[1]
    directions = rng.normal(size=(4, channels)).astype(np.float32)
    for shard in range(writer.num_shards):
        rows = writer.shard_rows(shard)
        spatial = rng.normal(size=(len(rows), regions, channels)).astype(np.float32)
        spatial += 2.0 * directions[[row % 4 for row in rows]][:, None, :]
        spatial = spatial.astype(dtype)
        pooled = spatial.astype(np.float32).mean(axis=1)
        failures = {row: "generated failure" for row in rows if row in set(failed)}
        writer.write_shard(shard, spatial, pooled, failures)
    return Path(path)


def write_split_pictures(store: Path, folder: Path, split: str = "test") -> Path:
    """A small distinct picture for each image of the store's `split`, in `folder` (the image
    folder an evaluation shows the pictures from)."""
    opened = FeatureStore.open(store)
    folder.mkdir(parents=True)
    for row in opened.split_indices(split):
        Image.new("RGB", (40, 30), (row * 10, 80, 160)).save(folder / opened.image_ids()[row])
    return folder


def damage(path: Path, array: str, shard: int) -> None:
    """Flip a few bytes in the middle of one shard's file, as a bad copy would."""
    file = path / array / "c" / str(shard) / "0"
    file = file / "0" if file.is_dir() else file
    data = bytearray(file.read_bytes())
    for offset in range(len(data) // 3, len(data) // 3 + 4):
        data[offset] ^= 0x5A
    file.write_bytes(bytes(data))


def failing_on_call(call: int, error_number: int, original):
    """`original` that raises OSError(`error_number`) on its `call`-th call instead of running:
    a disk that fills up or a folder whose permission changes half-way through a run."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise OSError(error_number, os.strerror(error_number), "the file being written")
        return original(*args, **kwargs)

    return failing


def at_batch_of_epoch_2(index: int, action: Callable[[], None]):
    """A FeatureStream.epoch that calls `action` as the training stream hands out batch `index`
    of the second epoch: a fault at a known step."""
    original = FeatureStream.epoch

    def epoch(self, epoch, start_batch=0):
        for number, batch in enumerate(original(self, epoch, start_batch), start_batch):
            if self.config.shuffle and epoch == 1 and number == index:
                action()
            yield batch

    return epoch


TIMING_KEYS = {"captions_per_s", "data_wait", "seconds"}


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]
