"""Checking a feature store chunk by chunk: what `captioner features verify` and
`extract --repair` use.

Stores carry a crc32c checksum of every chunk (stores made before that still read, and only damage
that breaks decompression shows in them). A damaged shard is named by its rows and image ids, and
so is a shard whose finished rows hold NaN or inf (which no decoder may read); repairing either
means extracting those images again, which `extract ... --repair` does for exactly those shards
(where the values were an overflow of float16, the extraction then says so and stops).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from zarr.codecs import Crc32cCodec, ShardingCodec

from captioner.progress import ShowProgress, tracked
from captioner.store import CHUNK_ERRORS, STATUS_DONE, FeatureStore, non_finite_rows

ARRAYS = ("spatial", "pooled")  # the arrays whose chunks hold features


@dataclass(frozen=True)
class DamagedShard:
    array: str  # "spatial" or "pooled"
    shard: int
    rows: list[int]  # the rows concerned: the whole shard, or those holding NaN or inf
    image_ids: list[str]  # of those rows
    problem: str  # what is wrong, as the predicate of a sentence: "is damaged (...)"

    def describe(self, store: FeatureStore, shown: int = 5) -> str:
        ids = ", ".join(self.image_ids[:shown])
        more = f" and {len(self.image_ids) - shown} more" if len(self.image_ids) > shown else ""
        rows = f"row{'s' * (len(self.rows) > 1)} {_row_ranges(self.rows)}"
        return f"{store.path}: {self.array} shard {self.shard}, {rows}, {self.problem}: {ids}{more}"


def _row_ranges(rows: list[int]) -> str:
    """Rows as runs: [4, 5, 6, 7] -> "4-7", [5, 9] -> "5, 9"."""
    runs: list[list[int]] = []
    for row in rows:
        if runs and row == runs[-1][-1] + 1:
            runs[-1].append(row)
        else:
            runs.append([row])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def has_checksums(store: FeatureStore) -> bool:
    """Whether every feature chunk of `store` carries a crc32c checksum."""
    for name in ARRAYS:
        codecs = store.array_codecs(name)
        inner = [c for codec in codecs if isinstance(codec, ShardingCodec) for c in codec.codecs]
        if not any(isinstance(codec, Crc32cCodec) for codec in (*codecs, *inner)):
            return False
    return True


def damaged_shards(store: FeatureStore, progress: ShowProgress = False) -> Iterator[DamagedShard]:
    """Read every shard of the feature arrays, yielding those whose chunks do not read back,
    whose finished rows all read back empty (a chunk file lost, say by an interrupted copy), or
    whose finished rows hold NaN or inf (those rows only)."""
    ids, done = store.image_ids(), store.status() == STATUS_DONE
    shards = range(-(-store.num_images // store.images_per_shard))
    # The bar counts shards (each read in every feature array), as the summaries do.
    for shard in tracked(shards, progress, "verifying", unit="shard", leave=False):
        start = shard * store.images_per_shard
        rows = np.arange(start, min(start + store.images_per_shard, store.num_images))
        for name in ARRAYS:
            problem, concerned = _shard_problem(store, name, shard, done[rows])
            if problem:
                named = rows[concerned].tolist()
                yield DamagedShard(name, shard, named, [ids[row] for row in named], problem)


def _shard_problem(
    store: FeatureStore, name: str, shard: int, finished: np.ndarray
) -> tuple[str, np.ndarray]:
    """What is wrong with one shard of the array `name` ("" when nothing is) and the positions
    within the shard it concerns; `finished` says which of its rows are done."""
    everything = np.arange(len(finished))
    try:
        values = store.read_shard(name, shard)
    except CHUNK_ERRORS as error:
        return f"is damaged ({error})", everything
    done_rows = np.flatnonzero(finished)
    done_values = values[done_rows].reshape(len(done_rows), int(np.prod(values.shape[1:])))
    if len(done_rows) and np.isnan(done_values).all():
        return "is damaged (its finished rows read back empty: a chunk file is missing)", everything
    bad = done_rows[non_finite_rows(done_values)]
    if len(bad) == 0:
        return "", bad
    count = int(np.count_nonzero(~np.isfinite(values[bad])))
    return f"holds NaN or inf ({count} value{'s' * (count > 1)})", bad
