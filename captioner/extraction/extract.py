"""Phase 1: run the frozen CNN once over a dataset and fill a feature store, resumably.

The pipeline: DataLoader workers decode and resize pictures; the main thread only moves batches
to the device and runs the CNN; a background thread assembles whole shards and writes them, so
compression and disk writes never stall the accelerator.

Work is cut along shard boundaries, and batches never straddle a shard. That makes three things
exact: a shard is written by exactly one process (torchrun ranks take shards round-robin), a run
killed at any moment resumes by redoing only the shards whose status is still pending, and the
resumed (or distributed) store equals an uninterrupted single-process one, because every image
is computed in the same batch as it would have been.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from captioner.corpus import Corpus
from captioner.devices import default_workers, resolve_device
from captioner.distributed import Ranks, process_group
from captioner.encoder import EncoderConfig, FrozenEncoder, build_encoder, image_transform
from captioner.errors import CaptionerError
from captioner.extraction.integrity import damaged_shards
from captioner.files import require_writable_folder
from captioner.images import ImageDataset, collate_images
from captioner.object_store import RemoteStore
from captioner.option_checks import at_least, check_options, one_of, optional
from captioner.precision import (
    ENCODER,
    PRECISIONS,
    Precision,
    given_precision,
    missing_bf16_support,
    resolve_precision,
)
from captioner.preemption import StopRequest
from captioner.progress import ShowProgress
from captioner.progress import bar as progress_bar
from captioner.progress import write as write_line
from captioner.readers import read_corpus
from captioner.store import (
    DEFAULT_COMPRESSION,
    DEFAULT_IMAGES_PER_SHARD,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_PENDING,
    FeatureStore,
    StoreLocation,
    StoreSettings,
    StoreWriter,
    corpus_digest,
    create_store,
    describe_failures,
    format_bytes,
    non_finite_rows,
    remove_partial_files,
)


@dataclass
class ExtractConfig:
    captions: Sequence[Path]
    images: Path
    out: StoreLocation  # a folder, or a RemoteStore in object storage
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    format: str | None = None
    splits_dir: Path | None = None
    keep_restval: bool = False
    device: str = "auto"
    # "auto" | "float32" | "bfloat16" (captioner.precision); a store being finished keeps its own
    precision: str = "auto"
    batch_size: int = 64
    workers: int = default_workers(4)
    dtype: str = "float16"
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD
    compression: str = DEFAULT_COMPRESSION
    limit: int | None = None  # only the first N images of the corpus, for trials
    overwrite: bool = False
    repair: bool = False  # re-extract the shards whose chunks are damaged


@dataclass
class ExtractSummary:
    path: StoreLocation
    images: int  # rows in the store
    done: int
    failed: int
    pending: int
    processed: int  # images this run computed (all ranks together)
    seconds: float
    images_per_second: float
    size_on_disk: int
    already_complete: bool
    failures: list[tuple[str, str]]  # (image id, reason) of every failed image in the store
    is_main_process: bool = True  # rank 0 under torchrun: the one that should report
    stopped: str = ""  # the signal that ended the run early (SIGTERM, SIGINT), if one did

    def describe(self, max_failures: int = 20) -> str:
        counts = f"{self.done} done, {self.failed} failed"
        if self.pending:
            counts += f", {self.pending} pending"
        size = format_bytes(self.size_on_disk)
        if self.already_complete:
            return f"nothing to do: {self.path} is already complete ({counts}, {size} on disk)"
        lines = [
            f"{self.path}: {self.images} images ({counts}), {size} on disk",
            f"this run: {self.processed} images in {self.seconds:.1f} s"
            f" ({self.images_per_second:.1f} images/s)",
        ]
        lines += describe_failures(self.failures, max_failures)
        if self.stopped:
            lines.append(
                f"stopped by {self.stopped} after the shard in hand: run the same command again"
                f" to extract the {self.pending} pending images"
            )
        return "\n".join(lines)


def extract_features(config: ExtractConfig, progress: ShowProgress = False) -> ExtractSummary:
    """Fill `config.out` with the features of every image of the corpus; resume if it exists.

    Under ``torchrun`` (WORLD_SIZE > 1) each rank takes its share of the shards. A store made with
    other settings or another corpus is refused unless `config.overwrite`.
    """
    started = time.perf_counter()
    check_options(
        config,
        {
            "batch_size": at_least(1),
            "limit": optional(at_least(1)),
            "precision": one_of(PRECISIONS),
        },
    )
    ranks = Ranks.from_environment()
    device = resolve_device(config.device, ranks.local_rank)
    with process_group(ranks, device), StopRequest() as stop:
        return _extract(config, ranks, device, stop, progress, started)


def _extract(
    config: ExtractConfig,
    ranks: Ranks,
    device: torch.device,
    stop: StopRequest,
    progress: ShowProgress,
    started: float,
) -> ExtractSummary:
    if ranks.is_main and isinstance(config.out, RemoteStore):
        config.out.require_bucket()
    elif ranks.is_main:
        require_writable_folder(config.out)
    corpus = _read_images_corpus(config, progress if ranks.is_main else False)
    # Rank 0 reads the precision of a store being finished; every rank computes in it.
    finishing, recorded = ranks.broadcast(_store_being_finished(config) if ranks.is_main else None)
    precision = _extraction_precision(config, device, finishing, recorded)
    encoder = build_encoder(config.encoder).to_device(device, precision)
    settings = StoreSettings(
        encoder=config.encoder,
        weights_id=encoder.weights_id,
        weights_checksum=encoder.weights_checksum,
        grid=encoder.grid,
        channels=encoder.channels,
        dtype=config.dtype,
        images_per_shard=config.images_per_shard,
        compression=config.compression,
        precision=recorded if finishing else precision.dtype,
    )
    # Rank 0 alone creates or checks the store; the others wait for its verdict.
    refusal = _prepare_store(config, corpus, settings) if ranks.is_main else None
    refusal = ranks.broadcast(refusal)
    if refusal:
        raise CaptionerError(refusal)
    if progress and ranks.is_main:
        write_line(precision.describe())

    writer = StoreWriter(config.out)
    if config.repair:
        if ranks.is_main:
            opened = FeatureStore.open(config.out)
            for damaged in damaged_shards(opened, progress=progress):
                writer.mark_pending(damaged.shard)
        ranks.broadcast(None)  # the others wait for the shards to be marked
    pending = writer.pending_shards()
    mine = [shard for shard in pending if shard % ranks.world_size == ranks.rank]
    loop_started = time.perf_counter()
    try:
        shown = progress if ranks.is_main else False
        processed = _extract_shards(writer, mine, corpus, encoder, device, config, stop, shown)
    except NonFiniteFeatures as found:
        raise CaptionerError(found.describe(config, corpus, encoder, writer)) from None
    loop_seconds = time.perf_counter() - loop_started
    (processed,) = ranks.sum([processed])  # also waits until every rank has finished writing

    store = FeatureStore.open(config.out)
    status = store.status()
    return ExtractSummary(
        path=config.out,
        images=store.num_images,
        done=int((status == STATUS_DONE).sum()),
        failed=int((status == STATUS_FAILED).sum()),
        pending=int((status == STATUS_PENDING).sum()),
        processed=processed,
        seconds=time.perf_counter() - started,
        images_per_second=processed / loop_seconds if loop_seconds > 0 else 0.0,
        size_on_disk=store.size_on_disk(),
        already_complete=not pending,
        stopped=stop.name,
        failures=store.failures(),
        is_main_process=ranks.is_main,
    )


def _read_images_corpus(config: ExtractConfig, progress: ShowProgress) -> Corpus:
    if not Path(config.images).is_dir():
        exists = Path(config.images).exists()
        what = "is a file, not an image folder" if exists else "image folder not found"
        raise CaptionerError(f"{config.images}: {what}")
    corpus = read_corpus(
        list(config.captions), config.format, config.splits_dir, config.keep_restval, progress
    )
    if config.limit is not None:
        corpus = corpus.subset(list(range(min(config.limit, len(corpus.images)))))
    if not corpus.images:
        raise CaptionerError(f"{config.captions[0]}: no images in the caption file")
    first = corpus.images[:100]
    if not any((Path(config.images) / image.path).is_file() for image in first):
        raise CaptionerError(
            f"{config.images}: none of the first {len(first)} images of the caption file is there "
            f"(e.g. {first[0].path}); is --images the folder that holds them?"
        )
    return corpus


def _store_being_finished(config: ExtractConfig) -> tuple[bool, str | None]:
    """(whether this run finishes an existing store, the precision that store records: None in
    a store made before stores recorded it)."""
    if config.overwrite or not config.out.exists():
        return False, None
    try:
        return True, FeatureStore.open(config.out).settings.precision
    except CaptionerError:
        return False, None  # _prepare_store says what is wrong with it


def _extraction_precision(
    config: ExtractConfig, device: torch.device, finishing: bool, recorded: str | None
) -> Precision:
    """The precision `config` asks for, except that a store being finished is finished in the
    precision it was started in (its features must all be computed alike: a resumed store equals
    an uninterrupted run), saying so when that is not what was asked for."""
    chosen = resolve_precision(config.precision, device, ENCODER)
    if not finishing or recorded is None or recorded == chosen.dtype:
        return chosen
    if recorded == "bfloat16" and (why_not := missing_bf16_support(device)):
        raise CaptionerError(
            f"{config.out}: its features were started in bfloat16, but {why_not}; finish it on"
            " a machine with bf16 support, or pass --overwrite to extract it again"
        )
    asked = "auto" if config.precision == "auto" else f"--precision {config.precision}"
    reason = (
        f"the precision {config.out} was started in; {asked} gives {chosen.dtype} here, which"
        " only --overwrite would use"
    )
    return given_precision(recorded, device, ENCODER, reason)


def _prepare_store(config: ExtractConfig, corpus: Corpus, settings: StoreSettings) -> str | None:
    """Create the store, or check that the existing one was made by this very command.
    Returns the reason for refusing, or None (a value every rank can receive)."""
    out = config.out
    try:
        if config.overwrite or not out.exists():
            provenance = {"images_root": str(Path(config.images).resolve())}
            create_store(out, corpus, settings, provenance, overwrite=config.overwrite)
            return None
        existing = FeatureStore.open(out)
    except CaptionerError as error:
        return f"{error}; choose another --out or pass --overwrite to replace it"
    differences = _differences(existing.settings.to_dict(), settings.to_dict())
    if existing.attrs["corpus"]["sha256"] != corpus_digest(corpus):
        differences.append("the images or captions differ (other caption files, splits or --limit)")
    if differences:
        return (
            f"{out}: was extracted with other settings: {'; '.join(differences)}. "
            "Pass --overwrite to replace it, or choose another --out"
        )
    remove_partial_files(out)  # a killed run's temporary files; nobody is writing yet
    return None


def _differences(stored: dict, requested: dict, prefix: str = "") -> list[str]:
    found = []
    for key in stored.keys() | requested.keys():
        old, new = stored.get(key), requested.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key} {old} in the store, {new} now")
    return sorted(found)


class NonFiniteFeatures(Exception):
    """A batch's features hold NaN or inf once cast to the store's dtype; found by the shard
    writer, which then writes nothing more (the shard in hand stays pending)."""

    def __init__(self, rows: np.ndarray, values: int, from_encoder: bool) -> None:
        super().__init__(f"{values} non-finite feature values in rows {rows.tolist()}")
        self.rows = rows  # the store rows (images) concerned
        self.values = values  # how many spatial values are NaN or inf
        self.from_encoder = from_encoder  # the float32 maps already were; else the cast made them

    def describe(
        self, config: ExtractConfig, corpus: Corpus, encoder: FrozenEncoder, writer: StoreWriter
    ) -> str:
        """The one line the user reads: which images, how many values, what to do."""
        shown = 3
        names = ", ".join(corpus.images[row].path for row in self.rows[:shown].tolist())
        more = f" and {len(self.rows) - shown} more" if len(self.rows) > shown else ""
        finished = writer.num_shards - len(writer.pending_shards())
        kept = (
            f"until then {config.out} keeps the shards finished so far ({finished} of"
            f" {writer.num_shards})"
        )
        if self.from_encoder:
            return (
                f"{config.out}: stopped: encoder {config.encoder.name} with weights"
                f" {encoder.weights_id} gave NaN or inf ({self.values} values) for"
                f" {len(self.rows)} images: {names}{more}; its weights are broken: run the same"
                f" command with other --weights (and --overwrite, which replaces this store);"
                f" {kept}"
            )
        largest = float(np.finfo(config.dtype).max)
        return (
            f"{config.out}: stopped: the features of {len(self.rows)} images overflow"
            f" {config.dtype} ({self.values} values beyond its ±{largest:.0f} would be stored as"
            f" inf): {names}{more}; run the same command with --dtype float32 --overwrite (which"
            f" replaces this {config.dtype} store), or with other --weights; {kept}"
        )


@dataclass
class _BatchResult:
    shard: int
    good_rows: np.ndarray
    spatial: torch.Tensor | None  # (G, L, C) in the store's dtype, on the CPU
    pooled: torch.Tensor | None  # (G, C) float32
    failures: list[tuple[int, str]]
    ready: torch.cuda.Event | None = None  # set when the copies from the GPU have landed


def _extract_shards(
    writer: StoreWriter,
    shards: list[int],
    corpus: Corpus,
    encoder: FrozenEncoder,
    device: torch.device,
    config: ExtractConfig,
    stop: StopRequest,
    progress: ShowProgress,
) -> int:
    """Compute and write `shards`; returns the number of images processed. A stop request ends it
    after the shard in hand (the shards not written stay pending for the next run)."""
    batches = [
        (shard, list(rows[i : i + config.batch_size]))
        for shard in shards
        for rows in [writer.shard_rows(shard)]
        for i in range(0, len(rows), config.batch_size)
    ]
    if not batches:
        return 0
    paths = [Path(config.images) / image.path for image in corpus.images]
    loader = DataLoader(
        ImageDataset(paths, image_transform(config.encoder)),
        batch_sampler=[rows for _, rows in batches],
        num_workers=config.workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    store_dtype = getattr(torch, writer.settings.dtype)
    ends_shard = [
        i == len(batches) - 1 or batches[i + 1][0] != shard for i, (shard, _) in enumerate(batches)
    ]
    processed = 0
    sink = _BackgroundShardWriter(writer, max_batches=4)
    total = sum(len(rows) for _, rows in batches)
    with progress_bar(progress, "extract", total, unit="img") as bar:
        try:
            with torch.inference_mode():
                loaded = zip(batches, loader, ends_shard, strict=True)
                for (shard, _), (_, images, good, failures), last_of_shard in loaded:
                    result = _BatchResult(shard, good.numpy(), None, None, failures)
                    if len(good):
                        features = encoder(images.to(device, non_blocking=True))
                        _to_host(result, features, store_dtype)
                    sink.put(result)
                    processed += len(good) + len(failures)
                    bar.update(len(good) + len(failures))
                    if stop.requested and last_of_shard:
                        break
        except Exception:
            if not stop.requested:  # (a signal can also end the DataLoader's workers)
                raise
        finally:
            sink.close()
    return processed


def _to_host(result: _BatchResult, features: torch.Tensor, dtype: torch.dtype) -> None:
    """Start the copies of spatial (cast) and pooled (mean of the float32 map) features to the
    host. On CUDA they run asynchronously and `result.ready` marks their end, so the GPU moves
    on to the next batch while the writer thread waits for them."""
    pooled, spatial = features.mean(dim=1), features.to(dtype)
    if features.is_cuda:
        result.spatial = torch.empty(spatial.shape, dtype=dtype, pin_memory=True)
        result.pooled = torch.empty(pooled.shape, dtype=torch.float32, pin_memory=True)
        result.spatial.copy_(spatial, non_blocking=True)
        result.pooled.copy_(pooled, non_blocking=True)
        result.ready = torch.cuda.Event()
        result.ready.record()
    else:
        result.spatial, result.pooled = spatial.cpu(), pooled.cpu()


class _ShardBuffer:
    def __init__(self, writer: StoreWriter, shard: int):
        rows = writer.shard_rows(shard)
        settings = writer.settings
        regions = settings.grid[0] * settings.grid[1]
        self.first_row, self.remaining = rows.start, len(rows)
        self.spatial = np.empty((len(rows), regions, settings.channels), dtype=settings.dtype)
        self.pooled = np.empty((len(rows), settings.channels), dtype=np.float32)
        self.failures: dict[int, str] = {}


class _BackgroundShardWriter:
    """A thread that gathers batch results into whole shards and writes each one when complete.

    The queue is bounded, so memory stays within a few batches and one shard buffer whatever the
    dataset size. Incomplete shards are never written: after a crash they are simply redone.
    """

    def __init__(self, writer: StoreWriter, max_batches: int):
        self._writer = writer
        self._queue: queue.Queue[_BatchResult | None] = queue.Queue(maxsize=max_batches)
        self._buffers: dict[int, _ShardBuffer] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def put(self, result: _BatchResult) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(result, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Finish writing what was queued, then stop; re-raises a failure of the thread."""
        if self._thread.is_alive():
            self.put(None)
            self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error  # as it was (a full disk is an OSError the CLI says in one line)

    def _run(self) -> None:
        try:
            while (result := self._queue.get()) is not None:
                self._add(result)
        except BaseException as error:  # handed to the main thread, which raises it
            self._error = error

    def _add(self, result: _BatchResult) -> None:
        buffer = self._buffers.get(result.shard)
        if buffer is None:
            buffer = self._buffers[result.shard] = _ShardBuffer(self._writer, result.shard)
        if result.ready is not None:
            result.ready.synchronize()
        if len(result.good_rows):
            _refuse_non_finite(result)
            offsets = result.good_rows - buffer.first_row
            buffer.spatial[offsets] = result.spatial.numpy()
            buffer.pooled[offsets] = result.pooled.numpy()
        buffer.failures.update(result.failures)
        buffer.remaining -= len(result.good_rows) + len(result.failures)
        if buffer.remaining == 0:
            self._writer.write_shard(result.shard, buffer.spatial, buffer.pooled, buffer.failures)
            del self._buffers[result.shard]


def _refuse_non_finite(result: _BatchResult) -> None:
    """NonFiniteFeatures if any image of the batch has NaN or inf in its stored maps (after the
    cast to the store's dtype) or in its pooled vector (the float32 maps' mean)."""
    spatial, pooled = result.spatial.numpy(), result.pooled.numpy()
    in_spatial, in_pooled = non_finite_rows(spatial), non_finite_rows(pooled)
    if len(in_spatial) or len(in_pooled):
        bad = np.union1d(in_spatial, in_pooled)
        values = int(np.count_nonzero(~np.isfinite(spatial[bad])))
        raise NonFiniteFeatures(result.good_rows[bad], values, from_encoder=len(in_pooled) > 0)
