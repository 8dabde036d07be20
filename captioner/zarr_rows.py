"""Rows of the store's Zarr arrays, read fast: runs of rows as slices, and whole shards of the
spatial maps decoded in one pass without zarr's per-chunk machinery.

zarr-python decodes a shard's inner chunks one at a time through its asynchronous codec
pipeline: a fixed cost a chunk, whatever its size (bench/RESULTS.md [reader]). A shard holds 64
one-image chunks, so on small maps that bookkeeping, not the bytes, bounded the reader.
`ShardDecoder` reads the layout captioner writes, straight from the Zarr v3 sharding
specification: one object per shard (fetched with one request through the same zarr store, so
object storage's retries and ``--cache`` apply), an index of (offset, length) pairs at its end
guarded by a crc32c, and each chunk stored as little-endian bytes, compressed (zstd or blosc) or
not, followed by the crc32c of what precedes it. Each chunk is checked against its crc32c and
decompressed straight into its row of the output; the decompression runs outside Python's lock,
so reader threads decode shards in parallel.

Where an array has any other layout, `ShardDecoder.for_array` returns None and zarr reads it.
A damaged chunk raises what zarr's codecs raise (ValueError for a checksum that does not match,
RuntimeError for data that does not decompress), so a damaged shard is reported alike either way.
A chunk whose checksum holds but whose data decompresses short of a row (which no writer of
captioner's makes) leaves the row's missing part at the fill value, NaN, which reads refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc, zstd
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

EMPTY = 2**64 - 1  # offset and length of a chunk that was never written
_INDEX_ENTRY = 16  # two little-endian uint64: offset, length
_CHECKSUM = 4
_DECOMPRESS = {ZstdCodec: zstd.decompress, BloscCodec: blosc.decompress}


class ShardDecoder:
    """Reads rows of a sharded (N, ...) array whose inner chunks hold one row each."""

    def __init__(self, array: zarr.Array, decompress) -> None:
        self._array = array
        self.rows_per_shard = int(array.shards[0])
        self._decompress = decompress  # None: chunks are stored uncompressed
        self._dtype = np.dtype(array.dtype).newbyteorder("<")
        self._fill = np.asarray(array.fill_value, dtype=array.dtype)

    @classmethod
    def for_array(cls, array: zarr.Array) -> ShardDecoder | None:
        """A decoder for `array`, or None where its layout is not the one captioner writes."""
        codecs = tuple(array.metadata.codecs)
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        if tuple(sharding.chunk_shape) != (1, *array.shape[1:]):
            return None
        if array.shards is None or tuple(array.shards[1:]) != tuple(array.shape[1:]):
            return None
        index_codecs = tuple(sharding.index_codecs)
        if (
            sharding.index_location.value != "end"
            or len(index_codecs) != 2
            or not _little_endian_bytes(index_codecs[0])
            or not isinstance(index_codecs[1], Crc32cCodec)
        ):
            return None
        inner = tuple(sharding.codecs)
        if not inner or not _little_endian_bytes(inner[0]):
            return None
        if not isinstance(inner[-1], Crc32cCodec):
            return None
        compressors = inner[1:-1]
        if not compressors:
            return cls(array, None)
        if len(compressors) == 1 and type(compressors[0]) in _DECOMPRESS:
            return cls(array, _DECOMPRESS[type(compressors[0])])
        return None

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` in the order given (duplicates allowed), each stored row decoded once.
        A shard of which at least half the rows are wanted is fetched whole and decoded here;
        from the others zarr reads just the chunks wanted, as fetching whole shards for a few
        rows would move many unneeded bytes."""
        return _in_order(rows, self._array.shape[1:], self._dtype, self._read_sorted)

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        shards = rows // self.rows_per_shard
        parts = []
        for shard in np.unique(shards).tolist():
            wanted = rows[shards == shard]
            if 2 * len(wanted) >= self._rows_in(shard):
                parts.append(self.read_shard(shard, wanted - shard * self.rows_per_shard))
            else:
                parts.append(read_array_rows(self._array, wanted))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read_shard(self, shard: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Rows `rows` (positions within the shard, ascending and distinct; all of them when
        None) of shard `shard`, read with one request and decoded into a new array."""
        rows = np.arange(self._rows_in(shard)) if rows is None else np.asarray(rows)
        # Filled first: a chunk that decompresses to fewer bytes than a row leaves the fill value
        # (NaN, which FeatureStore.read refuses), never what the memory held before.
        out = np.full((len(rows), *self._array.shape[1:]), self._fill, dtype=self._dtype)
        data = self._fetch(shard)
        if data is None:  # a shard never written holds the fill value
            return out
        index = self._index(data)
        for position, row in enumerate(rows.tolist()):
            offset, length = index[row]
            if (offset, length) != (EMPTY, EMPTY):
                self._decode_chunk(data[offset : offset + length], out[position])
        return out

    def _rows_in(self, shard: int) -> int:
        """How many rows shard `shard` holds: all but the last hold `rows_per_shard`."""
        return min(self.rows_per_shard, self._array.shape[0] - shard * self.rows_per_shard)

    def _fetch(self, shard: int) -> np.ndarray | None:
        """The shard's bytes, or None where it was never written. A file of a store on a disk
        is read here, without the round trip through zarr's event loop (about 1 ms a shard)."""
        store_path = self._array.store_path
        coordinates = (shard,) + (0,) * (self._array.ndim - 1)
        key = self._array.metadata.encode_chunk_key(coordinates)
        key = f"{store_path.path}/{key}" if store_path.path else key
        if isinstance(store_path.store, LocalStore):
            try:
                return np.fromfile(Path(store_path.store.root) / key, dtype=np.uint8)
            except FileNotFoundError:
                return None
        buffer = sync(store_path.store.get(key, prototype=default_buffer_prototype()))
        return None if buffer is None else buffer.as_numpy_array().view(np.uint8)

    def _index(self, data: np.ndarray) -> list[tuple[int, int]]:
        size = self.rows_per_shard * _INDEX_ENTRY
        if len(data) < size + _CHECKSUM:
            raise ValueError(f"a shard of {len(data)} bytes is shorter than its index")
        encoded = data[len(data) - size - _CHECKSUM :]
        _check(encoded)
        pairs = encoded[:size].view("<u8").reshape(-1, 2).tolist()
        for offset, length in pairs:
            if offset != EMPTY and offset + length > len(data) - size - _CHECKSUM:
                raise ValueError("a shard's index points past its chunks")
        return pairs

    def _decode_chunk(self, chunk: np.ndarray, row: np.ndarray) -> None:
        _check(chunk)
        payload = chunk[:-_CHECKSUM]
        target = row.view(np.uint8).reshape(-1)
        if self._decompress is not None:
            self._decompress(payload, target)  # outside Python's lock; raises RuntimeError
        elif len(payload) == target.nbytes:
            target[:] = payload
        else:
            raise ValueError(f"a chunk of {len(payload)} bytes where {target.nbytes} belong")


def _check(chunk: np.ndarray) -> None:
    """ValueError where the last 4 bytes of `chunk` are not the crc32c of the bytes before."""
    if len(chunk) < _CHECKSUM:
        raise ValueError("a chunk shorter than its checksum")
    stored = bytes(chunk[-_CHECKSUM:])
    computed = np.uint32(google_crc32c.value(chunk[:-_CHECKSUM])).tobytes()
    if computed != stored:
        raise ValueError(
            f"Stored and computed checksum do not match. Stored: {stored!r}."
            f" Computed: {computed!r}."
        )


def _little_endian_bytes(codec) -> bool:
    return isinstance(codec, BytesCodec) and (
        codec.endian is None or codec.endian.value == "little"
    )


def read_array_rows(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """Rows in the order given (duplicates allowed), each stored row read once, by zarr.

    Reads go by runs of consecutive rows as slices: zarr-python 3.1's integer-array (orthogonal)
    selection is 4x slower on plain arrays and over 20x slower on sharded ones (bench/extract.py).
    """

    def read_sorted(rows: np.ndarray) -> np.ndarray:
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
        parts = [np.asarray(array[int(run[0]) : int(run[-1]) + 1]) for run in runs]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    return _in_order(rows, array.shape[1:], array.dtype, read_sorted)


def _in_order(
    rows: np.ndarray, row_shape: tuple, dtype, read_sorted: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """`rows` in the order given (duplicates allowed), from `read_sorted`, which reads ascending
    distinct rows; not copied again where `rows` are ascending and distinct, as whole shards are."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, *row_shape), dtype=dtype)
    unique, inverse = np.unique(rows, return_inverse=True)
    values = read_sorted(unique)
    return values if np.array_equal(rows, unique) else values[inverse]
