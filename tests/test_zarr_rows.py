"""The whole-shard decoder reads exactly what zarr reads, and refuses what zarr refuses."""

from __future__ import annotations

import google_crc32c
import numpy as np
import pytest
import zarr
from factories import make_store
from numcodecs import zstd
from zarr.codecs import BytesCodec, Crc32cCodec, GzipCodec, ZstdCodec

from captioner.store import COMPRESSIONS, FeatureStore
from captioner.zarr_rows import ShardDecoder, read_array_rows

ROW_SETS = {
    "every row": np.arange(10),
    "reversed, repeated": np.array([9, 3, 3, 0, 8, 9]),
    "one row of a shard": np.array([5]),  # zarr reads it: a shard fetched for one row is waste
    "the short last shard": np.array([8, 9]),
    "none": np.zeros(0, dtype=np.int64),
}


def _spatial(path) -> zarr.Array:
    return zarr.open_group(str(path), mode="r")["spatial"]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_the_decoder_reads_what_zarr_reads(tmp_path, compression, dtype):
    path = make_store(tmp_path / "s.zarr", images=10, compression=compression, dtype=dtype)
    array = _spatial(path)
    decoder = ShardDecoder.for_array(array)
    assert decoder is not None
    for name, rows in ROW_SETS.items():
        ours, zarrs = decoder.read_rows(rows), read_array_rows(array, rows)
        assert ours.dtype == zarrs.dtype and ours.shape == zarrs.shape, name
        np.testing.assert_array_equal(ours, zarrs, err_msg=name)
    for shard in range(3):
        np.testing.assert_array_equal(
            decoder.read_shard(shard), np.asarray(array[4 * shard : 4 * shard + 4])
        )


def test_rows_never_written_read_as_nan_like_zarr_reads_them(tmp_path):
    path = make_store(tmp_path / "s.zarr", images=10)
    array = zarr.open_group(str(path), mode="r+")["spatial"]
    array[4] = np.nan  # zarr drops a chunk that holds only the fill value from its shard
    (path / "spatial" / "c" / "2" / "0" / "0").unlink()  # and a shard never written
    decoder = ShardDecoder.for_array(array)
    values = decoder.read_rows(np.arange(10))
    assert np.isnan(values[[4, 8, 9]]).all() and np.isfinite(np.delete(values, [4, 8, 9], 0)).all()
    np.testing.assert_array_equal(values, read_array_rows(array, np.arange(10)))


def test_a_damaged_chunk_or_index_raises_what_zarrs_codecs_raise(tmp_path):
    path = make_store(tmp_path / "s.zarr", images=8)
    decoder = ShardDecoder.for_array(_spatial(path))
    shard = path / "spatial" / "c" / "1" / "0" / "0"
    data = shard.read_bytes()
    for where in (10, len(data) - 20):  # inside the first chunk; inside the index
        damaged = bytearray(data)
        damaged[where] ^= 0x5A
        shard.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match="checksum"):
            decoder.read_shard(1)
        with pytest.raises(ValueError):
            np.asarray(_spatial(path)[4:8])
    shard.write_bytes(data[:30])
    with pytest.raises(ValueError, match="shorter than its index"):
        decoder.read_shard(1)
    np.testing.assert_array_equal(decoder.read_shard(0), np.asarray(_spatial(path)[0:4]))


def test_a_store_reports_a_damaged_shard_read_through_the_decoder(tmp_path):
    path = make_store(tmp_path / "s.zarr", images=8)
    shard = path / "spatial" / "c" / "1" / "0" / "0"
    damaged = bytearray(shard.read_bytes())
    damaged[10] ^= 0x5A
    shard.write_bytes(bytes(damaged))
    store = FeatureStore.open(path)
    with pytest.raises(Exception, match=r"spatial shard 1 \(rows 4-7\) is damaged"):
        store.read("spatial", np.arange(8))


@pytest.mark.parametrize("shape", [(10, 3), (10, 2, 3), (10, 2, 2, 3)])
@pytest.mark.parametrize("where", ["", "group/maps"])
def test_arrays_of_any_rank_at_the_root_or_in_a_group_read_as_zarr_reads_them(
    tmp_path, shape, where
):
    options = {
        "shape": shape,
        "chunks": (1, *shape[1:]),
        "shards": (4, *shape[1:]),
        "dtype": "float32",
        "fill_value": np.nan,
        "compressors": (ZstdCodec(level=1), Crc32cCodec()),
    }
    if where:
        array = zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_array(where, **options)
    else:
        array = zarr.create_array(str(tmp_path / "root.zarr"), **options)
    array[:] = np.arange(np.prod(shape), dtype="float32").reshape(shape)
    decoder = ShardDecoder.for_array(array)
    assert decoder is not None
    np.testing.assert_array_equal(decoder.read_rows(np.arange(10)), np.asarray(array[:]))


@pytest.mark.parametrize(
    "layout",
    [
        {"compressors": GzipCodec()},  # a compressor the decoder does not know
        {"serializer": BytesCodec(endian="big")},
        {"shards": None},  # no sharding at all
        {"chunks": (2, 4, 3)},  # two rows a chunk
    ],
    ids=["gzip", "big-endian", "unsharded", "two-row chunks"],
)
def test_other_layouts_are_left_to_zarr(tmp_path, layout):
    options = {"chunks": (1, 4, 3), "shards": (4, 4, 3), **layout}
    array = zarr.create_array(
        str(tmp_path / "a.zarr"), shape=(8, 4, 3), dtype="float32", fill_value=np.nan, **options
    )
    assert ShardDecoder.for_array(array) is None


def test_a_chunk_that_decompresses_short_of_a_row_leaves_nan_never_stale_memory(tmp_path):
    path = make_store(tmp_path / "s.zarr", images=4, dtype="float32")  # a row: 64 float32
    short = zstd.compress(np.ones(8, dtype="<f4").tobytes(), 1)  # 8 of them
    chunk = short + np.uint32(google_crc32c.value(short)).tobytes()
    index = np.full((4, 2), 2**64 - 1, dtype="<u8")
    index[0] = (0, len(chunk))
    index = index.tobytes() + np.uint32(google_crc32c.value(index.tobytes())).tobytes()
    (path / "spatial" / "c" / "0" / "0" / "0").write_bytes(chunk + index)
    row = ShardDecoder.for_array(_spatial(path)).read_shard(0)[0].reshape(-1)
    assert (row[:8] == 1).all() and np.isnan(row[8:]).all()
