"""Phase-2 data: batches of images with their captions, read from a feature store.

A batch is a group of IMAGES with some or all of their captions: each image's features are read
once and shared by its captions through `image_index`. The features are held one of three ways:

- pooled vectors (show-tell): read into RAM at start (all of COCO is 1 GB);
- spatial maps with `preload`: this rank's part of the split read at start, shard by shard, into
  RAM, or into a tensor on `preload_device` (a GPU: batches are then cut there, with no copy
  across the bus);
- spatial maps streamed: whole shards (the store's efficient unit) are read a window of
  `window_shards` at a time; the shard order and the images within a window are shuffled, so the
  memory held is a few shards however large the store is.

The order of an epoch is a pure function of (seed, epoch, rank), fixed before any feature is read.
That is what lets a killed run resume at batch k of an epoch and see exactly the batches an
uninterrupted run would have seen. Shards are read by `workers` threads and batches are assembled
`prefetch` steps ahead in a background thread, so the training step does not wait for data; the
threads change when the work is done, never what a batch holds. What reading ahead holds at most
is `workers` shards being read, the `window_shards` shards of a window, and `prefetch` + 1
assembled batches (in pinned memory when they go to a GPU: `pin_memory`).
Every read goes through FeatureStore.read, which refuses rows holding NaN or inf in one line: each
image is checked once per epoch as its shard is streamed in, or once at the start when in RAM.
Under DistributedDataParallel each rank reads its own disjoint part of the store (images for the
in-RAM modes, whole shards for streaming) and every rank runs the same number of batches.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from captioner.corpus import Corpus
from captioner.devices import device_memory
from captioner.errors import CaptionerError
from captioner.store import FeatureStore, format_bytes
from captioner.text import PAD_ID, Vocabulary

T = TypeVar("T")
R = TypeVar("R")
_NO_POSITIONS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class EncodedCaptions:
    """The captions of a list of images as padded token ids, grouped by image.

    The captions of image i (in the order the images were given) are rows
    ``first[i]:first[i + 1]`` of `tokens`.
    """

    tokens: np.ndarray  # (M, T) int64: <start> w.. <end>, then PAD_ID
    lengths: np.ndarray  # (M,) int64, start and end included
    first: np.ndarray  # (n_images + 1,) int64


def encode_captions(
    corpus: Corpus, vocabulary: Vocabulary, images: Sequence[int], max_length: int
) -> EncodedCaptions:
    """Encode the captions of `images` (indices into corpus.images), at most `max_length` words."""
    by_image = corpus.captions_by_image()
    encoded = [
        vocabulary.encode(corpus.captions[c].tokens, max_length)
        for i in images
        for c in by_image[i]
    ]
    counts = [len(by_image[i]) for i in images]
    first = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    return EncodedCaptions(*padded(encoded), first)


def padded(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token-id sequences as one (N, longest) int64 array padded with PAD_ID, and their lengths
    (N,); at least 2 columns, the <start> and <end> of an empty caption."""
    lengths = np.array([len(ids) for ids in sequences], dtype=np.int64)
    tokens = np.full((len(sequences), int(lengths.max(initial=2))), PAD_ID, dtype=np.int64)
    for row, ids in enumerate(sequences):
        tokens[row, : len(ids)] = ids
    return tokens, lengths


@dataclass
class Batch:
    rows: np.ndarray  # (B_img,) store rows of the images
    features: torch.Tensor  # (B_img, C) pooled or (B_img, L, C) spatial
    image_index: torch.Tensor  # (B_cap,) row of `features` that each caption describes
    captions: torch.Tensor  # (B_cap, T) int64, padded with PAD_ID
    lengths: torch.Tensor  # (B_cap,) int64, start and end included

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        move = [
            t.to(device, non_blocking=non_blocking)
            for t in (self.features, self.image_index, self.captions, self.lengths)
        ]
        return Batch(self.rows, *move)


@dataclass(frozen=True)
class StreamConfig:
    kind: str  # "pooled" | "spatial": the decoder's feature_kind
    batch_size: int = 32  # captions per batch: a batch holds batch_size // k whole images
    captions_per_image: int = 0  # k captions drawn per image each epoch; 0 = all of them
    shuffle: bool = True
    preload: bool = False  # hold spatial maps in memory instead of streaming shards
    preload_device: torch.device | None = None  # preload into a tensor there; None: into RAM
    window_shards: int = 4  # shards shuffled together when streaming
    # Group images of similar longest caption into batches (shuffled within a window or pool),
    # for decoders that run every caption of a batch to its longest.
    bucket_by_length: bool = False
    bucket_batches: int = 64  # in RAM: batches per pool of images sorted by length
    workers: int = 2  # shard-reading threads; 0 = no background threads at all
    prefetch: int = 4  # batches assembled ahead of the consumer
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    dtype: torch.dtype = torch.float32  # of Batch.features
    pin_memory: bool = False  # batches in page-locked RAM, for asynchronous copies to a GPU


@dataclass(frozen=True)
class EpochPlan:
    batches: list[np.ndarray]  # positions (indices into the stream's rows) of each batch
    reads: list[np.ndarray]  # positions of each shard, in the order streaming reads them


class FeatureStream:
    """Batches over the images `rows` of `store`, whose captions are `captions` (same order)."""

    def __init__(
        self,
        store: FeatureStore,
        rows: np.ndarray,
        captions: EncodedCaptions,
        config: StreamConfig,
    ) -> None:
        if config.kind not in ("pooled", "spatial"):
            raise ValueError(f"unknown feature kind {config.kind!r}")
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.captions = captions
        self.config = config
        self.held_in_memory = config.kind == "pooled" or config.preload
        self.peak_streamed_rows = 0  # most rows read from shards and not yet handed out
        self._streamed_rows = 0
        self._lock = threading.Lock()

        counts = np.diff(captions.first)
        usable = np.flatnonzero(counts > 0)  # an image without captions teaches nothing
        self._longest = np.zeros(len(counts), dtype=np.int64)  # position -> longest caption
        if len(usable):
            self._longest[usable] = np.maximum.reduceat(captions.lengths, captions.first[usable])
        mean_count = float(counts[usable].mean()) if len(usable) else 1.0
        per_image = config.captions_per_image or max(1, round(mean_count))
        self.images_per_batch = max(1, config.batch_size // per_image)
        rank, world = config.rank, config.world_size
        if self.held_in_memory:
            parts = [usable[r::world] for r in range(world)]
            self._positions = parts[rank]
            self._shards: list[np.ndarray] = []
        else:
            shard_of = self.rows[usable] // store.images_per_shard
            by_shard = np.argsort(shard_of, kind="stable")
            boundaries = np.flatnonzero(np.diff(shard_of[by_shard])) + 1
            groups = np.split(usable[by_shard], boundaries) if len(usable) else []
            parts = [np.concatenate(groups[r::world] or [_NO_POSITIONS]) for r in range(world)]
            self._shards = groups[rank::world]
            self._positions = parts[rank]
        # Every rank runs the same number of steps (DDP would hang otherwise); the few images a
        # larger part has beyond that are the last of its epoch order, which changes every epoch.
        self.num_batches = min(math.ceil(len(part) / self.images_per_batch) for part in parts)
        self._held_slot = np.full(len(self.rows), -1, dtype=np.int64)  # position -> held row
        self._held_features = self._load_held_features() if self.held_in_memory else None
        # Bytes of features held for the whole run (0 when streaming).
        self.held_bytes = 0 if self._held_features is None else _nbytes(self._held_features)

    # ---- the epoch order (no feature is read here) ----

    def plan(self, epoch: int) -> EpochPlan:
        rng = np.random.default_rng([self.config.seed, epoch, self.config.rank])
        shuffle, size = self.config.shuffle, self.images_per_batch
        if self.held_in_memory:
            order = rng.permutation(self._positions) if shuffle else self._positions
            pool = size * self.config.bucket_batches
            windows = [order[i : i + pool] for i in range(0, len(order), pool)]
            reads: list[np.ndarray] = []
        else:
            shard_order = (
                rng.permutation(len(self._shards)) if shuffle else range(len(self._shards))
            )
            reads = [self._shards[s] for s in shard_order]
            windows = [
                np.concatenate(reads[w : w + self.config.window_shards])
                for w in range(0, len(reads), self.config.window_shards)
            ]
            windows = [rng.permutation(w) if shuffle else w for w in windows]
        if self.config.bucket_by_length:
            batches = self._bucketed(windows, rng)
        else:
            order = np.concatenate(windows or [_NO_POSITIONS])
            batches = [order[i : i + size] for i in range(0, len(order), size)]
        return EpochPlan(batches[: self.num_batches], reads)

    def _bucketed(self, windows: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """Batches of images with similar longest captions: each window (already shuffled) is
        sorted by length and cut into batches, whose order is then shuffled within the window.
        Images left over at a window's end start the next one, so every batch but the last is
        full and spans at most two neighbouring windows (streaming memory stays bounded)."""
        size, batches = self.images_per_batch, []
        carried = _NO_POSITIONS
        for window in windows:
            window = np.concatenate([carried, window])
            window = window[np.argsort(self._longest[window], kind="stable")]
            full = len(window) - len(window) % size
            cut = [window[i : i + size] for i in range(0, full, size)]
            batches += [cut[i] for i in rng.permutation(len(cut))]
            carried = window[full:]
        return batches + ([carried] if len(carried) else [])

    def num_captions(self, epoch: int, start_batch: int = 0) -> int:
        """Captions in the batches of `epoch` from `start_batch` on."""
        counts = np.diff(self.captions.first)[self._batch_positions(epoch, start_batch)]
        k = self.config.captions_per_image
        return int(np.minimum(counts, k).sum() if k else counts.sum())

    def num_images(self, epoch: int, start_batch: int = 0) -> int:
        """Images in the batches of `epoch` from `start_batch` on."""
        return len(self._batch_positions(epoch, start_batch))

    def _batch_positions(self, epoch: int, start_batch: int) -> np.ndarray:
        return np.concatenate(self.plan(epoch).batches[start_batch:] or [_NO_POSITIONS])

    # ---- iteration ----

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` from batch `start_batch` on (what a resumed run still needs)."""
        plan = self.plan(epoch)
        if self.held_in_memory:
            produced = self._batches_from_held(plan, epoch, start_batch)
        else:
            produced = self._batches_from_shards(plan, epoch, start_batch)
        if self.config.workers > 0:
            produced = _in_background(produced, self.config.prefetch)
        for batch in produced:
            if not self.held_in_memory:
                self._count_streamed(-len(batch.rows))
            yield batch

    def _batches_from_held(self, plan: EpochPlan, epoch: int, start: int) -> Iterator[Batch]:
        held = self._held_features
        for index in range(start, len(plan.batches)):
            positions = plan.batches[index]
            slots = self._held_slot[positions]
            if isinstance(held, torch.Tensor):  # (on preload_device)
                slots = torch.from_numpy(slots).to(held.device)
            yield self._assemble(positions, held[slots], epoch, index)

    def _batches_from_shards(self, plan: EpochPlan, epoch: int, start: int) -> Iterator[Batch]:
        needed = np.zeros(len(self.rows), dtype=bool)
        for positions in plan.batches[start:]:
            needed[positions] = True
        reads = [group[needed[group]] for group in plan.reads]
        reads = [group for group in reads if len(group)]
        loaded = _ordered_map(self._read_shard, reads, self.config.workers)
        held: dict[int, np.ndarray] = {}  # position -> spatial map, read but not yet batched
        try:
            for index in range(start, len(plan.batches)):
                positions = plan.batches[index]
                while any(p not in held for p in positions):
                    group, features = next(loaded)
                    held.update(zip(group.tolist(), features, strict=True))
                features = np.stack([held.pop(p) for p in positions.tolist()])
                yield self._assemble(positions, features, epoch, index)
        finally:
            loaded.close()

    def _read_shard(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features = self.store.read("spatial", self.rows[positions])
        self._count_streamed(len(positions))
        return positions, features

    def _count_streamed(self, change: int) -> None:
        with self._lock:
            self._streamed_rows += change
            self.peak_streamed_rows = max(self.peak_streamed_rows, self._streamed_rows)

    def _assemble(
        self, positions: np.ndarray, features: np.ndarray | torch.Tensor, epoch: int, index: int
    ) -> Batch:
        """One batch: the images' features (as read, or already on `preload_device`) and their
        chosen captions, padded to the longest; in pinned memory where the config asks."""
        image_index, chosen = self._choose_captions(positions, epoch, index)
        lengths = self.captions.lengths[chosen]
        tokens = self.captions.tokens[chosen, : lengths.max()]
        tensors = [
            torch.as_tensor(features).to(self.config.dtype),
            torch.from_numpy(image_index),
            torch.from_numpy(tokens),
            torch.from_numpy(lengths),
        ]
        if self.config.pin_memory:
            tensors = [t.pin_memory() if t.device.type == "cpu" else t for t in tensors]
        return Batch(self.rows[positions], *tensors)

    def _choose_captions(
        self, positions: np.ndarray, epoch: int, index: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The captions batch `index` of `epoch` trains on, ascending within each image: all
        of each image's, or `captions_per_image` of them (drawn at random when shuffling, else
        the first); and for each, the batch row of its image. Drawn for the whole batch at
        once: a draw per image cost more than the rest of assembling a batch."""
        first = self.captions.first
        counts = first[positions + 1] - first[positions]
        image_index = np.repeat(np.arange(len(positions)), counts)
        group_start = np.repeat(np.cumsum(counts) - counts, counts)
        chosen = np.repeat(first[positions], counts) + np.arange(counts.sum()) - group_start
        k = self.config.captions_per_image
        if not k or counts.max(initial=0) <= k:
            return image_index, chosen
        if self.config.shuffle:  # the k captions of lowest random key in each image
            rng = np.random.default_rng([self.config.seed, epoch, self.config.rank, index])
            by_key = np.lexsort((rng.random(len(chosen)), image_index))
            keep = np.zeros(len(chosen), dtype=bool)
            keep[by_key[np.arange(len(chosen)) - group_start < k]] = True
        else:
            keep = np.arange(len(chosen)) - group_start < k
        return image_index[keep], chosen[keep]

    def _load_held_features(self) -> np.ndarray | torch.Tensor:
        """This rank's features: pooled vectors in RAM, or (preload) spatial maps read shard by
        shard into RAM or a tensor on `preload_device`, never more than one shard beside them."""
        positions = np.sort(self._positions)
        self._held_slot[positions] = np.arange(len(positions))
        rows = self.rows[positions]
        if self.config.kind == "pooled":
            return self.store.read("pooled", rows)
        shape = (len(rows), self.store.grid[0] * self.store.grid[1], self.store.channels)
        device = self.config.preload_device
        if device is None:
            features = np.empty(shape, dtype=self.store.dtype)
        else:
            dtype = getattr(torch, self.store.dtype)
            needed = math.prod(shape) * dtype.itemsize
            check_fits(needed, device_memory(device), f"{self.store.path}: --preload gpu")
            features = torch.empty(shape, dtype=dtype, device=device)
        shard_of = rows // self.store.images_per_shard
        for shard in np.unique(shard_of):
            in_shard = np.flatnonzero(shard_of == shard)  # consecutive: the rows are sorted
            maps = self.store.read("spatial", rows[in_shard])
            where = slice(int(in_shard[0]), int(in_shard[-1]) + 1)
            features[where] = maps if device is None else torch.from_numpy(maps).to(device)
        return features


# What a GPU keeps free beside preloaded maps, for the decoder's weights, activations and
# optimizer: the larger of 2 GiB and a tenth of its memory.
PRELOAD_RESERVE_BYTES, PRELOAD_RESERVE_SHARE = 2 << 30, 0.1


def check_fits(needed: int, memory: tuple[int, int] | None, what: str) -> None:
    """Refuse in one line to preload `needed` bytes into a device whose (free, total) bytes are
    `memory` unless the reserve stays free beside them (None: the device does not say)."""
    if memory is None:
        return
    free, total = memory
    reserve = max(PRELOAD_RESERVE_BYTES, int(PRELOAD_RESERVE_SHARE * total))
    if needed + reserve > free:
        raise CaptionerError(
            f"{what}: the maps take {format_bytes(needed)}, more than the"
            f" {format_bytes(max(free - reserve, 0))} the GPU has free beside"
            f" {format_bytes(reserve)} kept for training; hold them in RAM (--preload ram) or"
            " stream them (no --preload)"
        )


def _nbytes(features: np.ndarray | torch.Tensor) -> int:
    if isinstance(features, torch.Tensor):
        return features.numel() * features.element_size()
    return int(features.nbytes)


def _ordered_map(function: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """`map(function, items)` with up to `workers` calls running ahead in threads, in order."""
    if workers <= 0:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _in_background(items: Iterator[T], depth: int) -> Iterator[T]:
    """Run the iterator `items` in a thread up to `depth` items ahead; its errors re-raise here."""
    out: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    finished = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(finished)
        except BaseException as error:  # noqa: B036 - handed to the consumer thread
            put(_Failure(error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="feature-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is finished:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
