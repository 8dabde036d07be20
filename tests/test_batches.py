"""The phase-2 data stream: coverage, shared feature reads, bounded memory, determinism, ranks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from factories import make_store

from captioner.store import FeatureStore
from captioner.text import PAD_ID, Vocabulary
from captioner.training.batches import FeatureStream, StreamConfig, encode_captions


class CountingStore:
    """A FeatureStore that counts the rows each read of spatial maps asks for."""

    def __init__(self, store: FeatureStore) -> None:
        self._store = store
        self.spatial_reads: list[np.ndarray] = []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def read(self, kind, rows):
        if kind == "spatial":
            self.spatial_reads.append(np.asarray(rows))
        return self._store.read(kind, rows)


def open_stream(path, split="train", **options):
    store = CountingStore(FeatureStore.open(path))
    corpus = store.corpus()
    vocabulary = Vocabulary.build(corpus.tokens_of_split("train"), min_count=1)
    rows = store.split_indices(split)
    captions = encode_captions(corpus, vocabulary, rows.tolist(), max_length=20)
    config = StreamConfig(kind=options.pop("kind", "spatial"), **options)
    return FeatureStream(store, rows, captions, config), store, corpus, vocabulary


def caption_texts(batch, vocabulary):
    return [" ".join(vocabulary.decode(row.tolist())) for row in batch.captions]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    # 40 images, 4 per shard, 3 captions each; train = the first 20 rows (5 shards).
    return make_store(
        tmp_path_factory.mktemp("batches") / "store.zarr",
        images=40,
        images_per_shard=4,
        split_fractions=(0.5, 0.25, 0.25),
    )


@pytest.mark.parametrize(
    "mode",
    [
        dict(kind="pooled"),
        dict(kind="spatial"),
        dict(kind="spatial", preload=True),
        dict(kind="spatial", bucket_by_length=True),
        dict(kind="spatial", preload=True, bucket_by_length=True, bucket_batches=2),
    ],
    ids=[
        "pooled",
        "spatial-streamed",
        "spatial-preloaded",
        "streamed-bucketed",
        "preloaded-bucketed",
    ],
)
@pytest.mark.parametrize("workers", [0, 2])
def test_every_caption_once_per_epoch_with_its_own_image_features(store_path, mode, workers):
    stream, store, corpus, vocabulary = open_stream(
        store_path, batch_size=7, window_shards=2, workers=workers, **mode
    )
    train = [c for c in corpus.captions if corpus.images[c.image].split == "train"]
    expected = Counter((c.image, " ".join(c.tokens)) for c in train)
    seen = Counter()
    batches = list(stream.epoch(0))
    assert len(batches) == stream.num_batches > 1
    for batch in batches:
        assert len(set(batch.rows.tolist())) == len(batch.rows)  # one feature row per image
        assert batch.features.dtype == torch.float32
        for caption_row, text in zip(
            batch.image_index.tolist(), caption_texts(batch, vocabulary), strict=True
        ):
            seen[(int(batch.rows[caption_row]), text)] += 1
        stored = (
            store.read_pooled(batch.rows)
            if mode["kind"] == "pooled"
            else store._store.read_spatial(batch.rows)
        )
        np.testing.assert_allclose(batch.features.numpy(), stored.astype(np.float32))
        # lengths count start and end; everything past them is padding
        assert batch.captions.shape[1] == int(batch.lengths.max())
        for caption, length in zip(batch.captions, batch.lengths, strict=True):
            assert (caption[length:] == PAD_ID).all() and (caption[:length] != PAD_ID).all()
    assert seen == expected
    assert sum(b.num_captions for b in batches) == stream.num_captions(0)


def test_streaming_reads_each_image_once_in_whole_shards(store_path):
    stream, store, _, _ = open_stream(store_path, batch_size=6, window_shards=2, workers=2)
    list(stream.epoch(3))
    read_rows = np.concatenate(store.spatial_reads)
    assert sorted(read_rows.tolist()) == sorted(stream.rows.tolist())  # every image once
    for rows in store.spatial_reads:  # each read is one whole shard
        assert len(set((rows // store.images_per_shard).tolist())) == 1
        assert len(rows) == store.images_per_shard


@pytest.mark.parametrize("bucket_by_length", [False, True])
def test_memory_held_while_streaming_does_not_grow_with_the_store(tmp_path, bucket_by_length):
    peaks = {}
    for images in (48, 192):
        path = make_store(
            tmp_path / f"s{images}.zarr",
            images=images,
            images_per_shard=4,
            split_fractions=(1, 0, 0),
        )
        stream, _, _, _ = open_stream(
            path,
            batch_size=6,
            window_shards=2,
            workers=2,
            prefetch=2,
            bucket_by_length=bucket_by_length,
        )
        assert len(list(stream.epoch(0))) == stream.num_batches
        peaks[images] = stream.peak_streamed_rows
    # window (2 shards) + reads in flight (2 shards) + queued batches (2 x 2 images) + one batch;
    # bucketed, a window's leftover images (less than a batch) wait for the next window
    bound = (2 + 2) * 4 + 3 * 2 + bucket_by_length * 2
    assert 0 < peaks[48] <= bound and 0 < peaks[192] <= bound


@pytest.mark.parametrize("preload", [False, True])
def test_bucketing_by_length_pads_less_and_keeps_batches_full(tmp_path, preload):
    """Batches of images with similar longest captions: fewer padded steps for a decoder that runs
    each batch to its longest caption; every batch but the last still has its full images."""
    path = make_store(
        tmp_path / "s.zarr",
        images=96,
        images_per_shard=8,
        captions_per_image=2,
        split_fractions=(1, 0, 0),
    )
    options = dict(batch_size=8, window_shards=4, workers=0, preload=preload, bucket_batches=6)
    plain, _, _, _ = open_stream(path, **options)
    bucketed, _, _, _ = open_stream(path, bucket_by_length=True, **options)

    def padded_steps(stream):
        return sum(b.num_captions * int(b.lengths.max()) for b in stream.epoch(1))

    assert padded_steps(bucketed) < 0.95 * padded_steps(plain)
    plan = bucketed.plan(1)
    assert [len(b) for b in plan.batches[:-1]] == [bucketed.images_per_batch] * (
        len(plan.batches) - 1
    )
    assert sorted(np.concatenate(plan.batches).tolist()) == sorted(
        np.concatenate(plain.plan(1).batches).tolist()
    )
    assert [b.tolist() for b in plan.batches] != [b.tolist() for b in bucketed.plan(2).batches]


def test_epoch_order_is_seeded_and_a_resumed_epoch_continues_it(store_path):
    def order(stream, epoch, start=0):
        return [b.rows.tolist() + caption_texts(b, vocabulary) for b in stream.epoch(epoch, start)]

    first, _, _, vocabulary = open_stream(store_path, batch_size=6, seed=5, workers=2)
    again, _, _, _ = open_stream(store_path, batch_size=6, seed=5, workers=0)
    assert order(first, 2) == order(again, 2)
    assert order(first, 2) != order(first, 3)
    assert order(first, 2)[3:] == order(again, 2, start=3)
    other_seed, _, _, _ = open_stream(store_path, batch_size=6, seed=6, workers=2)
    assert order(first, 2) != order(other_seed, 2)


def test_captions_per_image_draws_k_captions_and_changes_them_by_epoch(store_path):
    stream, _, _, vocabulary = open_stream(
        store_path, kind="pooled", batch_size=8, captions_per_image=2
    )
    assert stream.images_per_batch == 4
    drawn = {}
    for epoch in (0, 1):
        for batch in stream.epoch(epoch):
            assert np.bincount(batch.image_index.numpy()).tolist() == [2] * len(batch.rows)
            for row, text in zip(
                batch.image_index.tolist(), caption_texts(batch, vocabulary), strict=True
            ):
                drawn.setdefault(epoch, set()).add((int(batch.rows[row]), text))
    assert drawn[0] != drawn[1]


def test_the_k_captions_drawn_are_the_images_own_and_each_as_likely(store_path):
    stream, _, corpus, vocabulary = open_stream(
        store_path, kind="pooled", batch_size=8, captions_per_image=2
    )
    own = {}  # row -> Counter of its caption texts
    for caption in corpus.captions:
        own.setdefault(caption.image, Counter())[" ".join(caption.tokens)] += 1
    drawn, epochs = Counter(), 60
    for epoch in range(epochs):
        for batch in stream.epoch(epoch):
            texts = caption_texts(batch, vocabulary)
            pairs = list(zip(batch.image_index.tolist(), texts, strict=True))
            for slot, row in enumerate(batch.rows.tolist()):
                mine = Counter(text for i, text in pairs if i == slot)
                assert mine.total() == 2 and mine <= own[row], (row, mine)
                drawn.update((row, text) for text in mine.elements())
    # Two of three captions: each is drawn in 2/3 of the epochs (binomial sd 0.06 at 60).
    rows = {row for row, _ in drawn}
    shares = [drawn[row, text] / (epochs * n) for row in rows for text, n in own[row].items()]
    assert len(rows) == 20 and 0.45 < min(shares) and max(shares) < 0.88, shares


@pytest.mark.parametrize("mode", [dict(kind="pooled"), dict(kind="spatial")])
def test_ranks_read_disjoint_parts_and_run_the_same_number_of_batches(store_path, mode):
    parts = []
    for rank in (0, 1):
        stream, store, _, _ = open_stream(
            store_path, batch_size=3, world_size=2, rank=rank, window_shards=1, **mode
        )
        batches = list(stream.epoch(0))
        parts.append({row for b in batches for row in b.rows.tolist()})
        assert len(batches) == stream.num_batches
        if mode["kind"] == "spatial":
            assert {int(r) for rows in store.spatial_reads for r in rows} == parts[-1]
    assert parts[0] and parts[1] and not parts[0] & parts[1]


def test_a_read_error_in_the_background_reaches_the_consumer(store_path):
    stream, store, _, _ = open_stream(store_path, batch_size=6, workers=2)

    def broken(kind, rows):
        raise OSError("disk gone")

    store.read = broken
    with pytest.raises(OSError, match="disk gone"):
        list(stream.epoch(0))
