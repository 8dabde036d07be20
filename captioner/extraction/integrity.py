"""Checking a feature store chunk by chunk: what `captioner features verify` and
`extract --repair` use.

Stores carry a crc32c checksum of every chunk (stores made before that still read, and only damage
that breaks decompression shows in them). A damaged shard is named by its rows and image ids;
repairing it means extracting those images again, which `extract ... --repair` does for exactly
the damaged shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm
from zarr.codecs import Crc32cCodec, ShardingCodec

from captioner.store import CHUNK_ERRORS, STATUS_DONE, FeatureStore

ARRAYS = ("spatial", "pooled")  # the arrays whose chunks hold features


@dataclass(frozen=True)
class DamagedShard:
    array: str  # "spatial" or "pooled"
    shard: int
    rows: range
    image_ids: list[str]
    reason: str

    def describe(self, store: FeatureStore, shown: int = 5) -> str:
        ids = ", ".join(self.image_ids[:shown])
        more = f" and {len(self.image_ids) - shown} more" if len(self.image_ids) > shown else ""
        return (
            f"{store.path}: {self.array} shard {self.shard}, rows {self.rows.start}-"
            f"{self.rows.stop - 1}, is damaged ({self.reason}): {ids}{more}"
        )


def has_checksums(store: FeatureStore) -> bool:
    """Whether every feature chunk of `store` carries a crc32c checksum."""
    for name in ARRAYS:
        codecs = store.array_codecs(name)
        inner = [c for codec in codecs if isinstance(codec, ShardingCodec) for c in codec.codecs]
        if not any(isinstance(codec, Crc32cCodec) for codec in (*codecs, *inner)):
            return False
    return True


def damaged_shards(store: FeatureStore, progress: bool = False) -> Iterator[DamagedShard]:
    """Read every shard of the feature arrays, yielding those whose chunks do not read back, or
    whose finished rows read back empty (a chunk file lost, say by an interrupted copy)."""
    ids, done = store.image_ids(), store.status() == STATUS_DONE
    shards = range(-(-store.num_images // store.images_per_shard))
    # The bar counts shards (each read in every feature array), as the summaries do.
    for shard in tqdm(shards, "verifying", unit="shard", leave=False, disable=not progress):
        start = shard * store.images_per_shard
        rows = range(start, min(start + store.images_per_shard, store.num_images))
        for name in ARRAYS:
            if reason := _unreadable_shard(store, name, shard, done[rows.start : rows.stop]):
                yield DamagedShard(name, shard, rows, ids[rows.start : rows.stop], reason)


def _unreadable_shard(store: FeatureStore, name: str, shard: int, done: np.ndarray) -> str:
    """Why the shard of array `name` does not read back whole ("" when it does); `done`: which of
    its rows are finished."""
    try:
        values = store.read_shard(name, shard)
    except CHUNK_ERRORS as error:
        return str(error)
    finished = values[done].reshape(-1, values[0].size)
    if np.isnan(finished).all(axis=1).any():
        return "finished rows read back empty: a chunk file is missing"
    return ""
