"""The feature store's schema, reader and writer, on stores made by tests/factories.py."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from factories import make_corpus, make_store

from captioner.corpus import SkippedLine
from captioner.encoder import EncoderConfig
from captioner.errors import CaptionerError
from captioner.store import (
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_PENDING,
    FeatureStore,
    StoreSettings,
    StoreWriter,
    create_store,
)


def test_make_store_gives_a_complete_readable_store(tmp_path):
    path = make_store(tmp_path / "s.zarr", images=10, grid=(2, 3), channels=8, failed=[3])
    store = FeatureStore.open(path)

    assert (store.num_images, store.grid, store.channels, store.dtype) == (10, (2, 3), 8, "float16")
    assert store.images_per_shard == 4
    assert store.image_ids() == [f"img_{i:03d}.jpg" for i in range(10)]
    status = store.status()
    assert status.dtype == np.uint8 and status[3] == STATUS_FAILED
    assert (np.delete(status, 3) == STATUS_DONE).all()
    assert store.failures() == [("img_003.jpg", "generated failure")]

    train = store.split_indices("train")
    assert train.tolist() == [0, 1, 2, 4]  # row 3 failed, rows 5.. are val/test
    assert store.split_indices("nonsense").size == 0

    corpus = store.corpus()
    assert corpus == make_corpus(10, 3, seed=0)
    assert len(corpus.captions) == 30


def test_skipped_lines_keep_their_location(tmp_path):
    """A corpus's skipped lines read back from the store as they were: line numbers of text files
    and items of JSON files (stores written before items were kept read back without them)."""
    corpus = make_corpus(8, 2)
    corpus.skipped.append(SkippedLine("captions.txt", 17, "no tab"))
    corpus.skipped.append(SkippedLine("dataset_coco.json", 0, "no sentences", "images[3]"))
    encoder = EncoderConfig("tiny", "none", 64)
    settings = StoreSettings(encoder, "generated", "generated", grid=(2, 2), channels=4)
    create_store(tmp_path / "s.zarr", corpus, settings)
    skipped = FeatureStore.open(tmp_path / "s.zarr").corpus().skipped
    assert skipped == corpus.skipped
    assert [s.location() for s in skipped] == ["captions.txt:17", "dataset_coco.json images[3]"]


def test_reads_follow_the_requested_order(tmp_path):
    store = FeatureStore.open(make_store(tmp_path / "s.zarr", images=9, channels=5))
    rows = np.array([7, 0, 7, 4])
    spatial = store.read_spatial(rows)
    assert spatial.shape == (4, 4, 5) and spatial.dtype == np.float16
    everything = store.read_spatial(np.arange(9))
    np.testing.assert_array_equal(spatial, everything[rows])

    pooled = store.read_pooled(rows)
    assert pooled.dtype == np.float32
    np.testing.assert_array_equal(pooled, store.read_pooled()[rows])
    np.testing.assert_allclose(pooled, everything[rows].astype(np.float32).mean(1), rtol=1e-6)
    assert store.read_spatial(np.array([], dtype=int)).shape == (0, 4, 5)


def test_a_store_pickles_by_path(tmp_path):
    store = FeatureStore.open(make_store(tmp_path / "s.zarr"))
    copy = pickle.loads(pickle.dumps(store))
    assert copy.path == store.path and copy.fingerprint == store.fingerprint


def test_fingerprint_depends_on_features_identity_not_on_path(tmp_path):
    a = FeatureStore.open(make_store(tmp_path / "a.zarr", seed=1))
    b = FeatureStore.open(make_store(tmp_path / "b.zarr", seed=1))
    c = FeatureStore.open(make_store(tmp_path / "c.zarr", seed=2))  # other weights checksum
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_writer_writes_whole_shards_and_rows_not_done_are_nan(tmp_path):
    settings = StoreSettings(
        EncoderConfig("tiny", "none", 64), "w", "sum", (2, 2), 3, images_per_shard=4
    )
    writer = create_store(tmp_path / "s.zarr", make_corpus(10), settings)
    assert writer.num_shards == 3 and writer.pending_shards() == [0, 1, 2]
    assert list(writer.shard_rows(2)) == [8, 9]

    writer.write_shard(2, np.ones((2, 4, 3)), np.ones((2, 3)), {9: "broken"})
    assert writer.pending_shards() == [0, 1]
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.status().tolist() == [STATUS_PENDING] * 8 + [STATUS_DONE, STATUS_FAILED]
    assert np.isnan(store.read_spatial(np.array([0, 9]))).all()
    assert np.isnan(store.read_pooled(np.array([9]))).all()
    assert (store.read_spatial(np.array([8])) == 1).all()
    assert store.failures() == [("img_009.jpg", "broken")]
    assert isinstance(StoreWriter(tmp_path / "s.zarr").settings, StoreSettings)


def test_create_refuses_to_replace_without_overwrite(tmp_path):
    path = make_store(tmp_path / "s.zarr", seed=1)
    settings = FeatureStore.open(path).settings
    with pytest.raises(CaptionerError, match="already exists"):
        create_store(path, make_corpus(4), settings)
    create_store(path, make_corpus(4), settings, overwrite=True)
    assert FeatureStore.open(path).status().tolist() == [STATUS_PENDING] * 4
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # no temporary leftovers


def make_not_a_store(kind: str, path: Path) -> None:
    """Something at `path` that is not a complete feature store, of the given kind."""
    if kind == "a plain folder":
        path.mkdir()
    elif kind == "a file":
        path.write_text("not a store")
    elif kind == "another zarr group":
        zarr.open_group(str(path), mode="w").attrs["made_by"] = "someone else"
    elif kind == "a zarr array":
        zarr.create_array(str(path), shape=(3,), dtype="float32")
    elif kind == "damaged metadata":
        path.mkdir()
        (path / "zarr.json").write_text("{not json")
    elif kind in ("a newer schema", "an array lost"):
        make_store(path, images=4)
        metadata = json.loads((path / "zarr.json").read_text())
        if kind == "a newer schema":
            metadata["attributes"]["schema_version"] = 99
            (path / "zarr.json").write_text(json.dumps(metadata))
        else:
            shutil.rmtree(path / "status")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such feature store"),
        ("a plain folder", r"not a feature store \(no zarr.json\); `captioner extract` makes"),
        ("a file", "is a file, not a feature store"),
        ("another zarr group", "a Zarr group but not a feature store"),
        ("a zarr array", "a Zarr array, not a feature store"),
        ("damaged metadata", "a damaged feature store"),
        ("a newer schema", "schema version 99; this captioner reads version 1"),
        ("an array lost", r"incomplete or damaged feature store \(no 'status'\); extract it again"),
    ],
)
def test_open_says_in_its_own_words_what_is_not_a_store(tmp_path, kind, message):
    path = tmp_path / "thing.zarr"
    make_not_a_store(kind, path)
    with pytest.raises(CaptionerError, match=message) as caught:
        FeatureStore.open(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_describe_summarizes_the_store(tmp_path):
    text = FeatureStore.open(make_store(tmp_path / "s.zarr", failed=[0])).describe()
    assert "(12, 4, 16) float16" in text
    assert "done 11, failed 1" in text
    assert "train 6 (5 done), val 3 (3 done), test 3 (3 done)" in text
    assert "img_000.jpg: generated failure" in text
