"""What a run trains and validates on: the corpus, the store rows of each split, and the
feature streams over them, with the reading ahead that suits the device."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from captioner.corpus import Corpus
from captioner.devices import available_cpus, default_workers
from captioner.distributed import Ranks
from captioner.errors import CaptionerError
from captioner.progress import ShowProgress
from captioner.progress import bar as progress_bar
from captioner.store import FeatureStore, format_bytes
from captioner.text import Vocabulary
from captioner.training.batches import FeatureStream, StreamConfig, encode_captions
from captioner.training.config import TrainConfig

STATISTICS_IMAGES = 512  # spatial statistics come from this many evenly spaced training images
_STATISTICS_CHUNK_BYTES = 64 << 20  # float64 values held at once while summing


def feature_statistics(
    store: FeatureStore, rows: np.ndarray, kind: str, progress: ShowProgress = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (C,) of what a decoder of `kind` reads from the training images
    `rows`: all their pooled vectors, or every region of up to STATISTICS_IMAGES of their maps.

    Read in chunks of at most 64 MB and summed in float64, so memory stays flat for any store;
    a row holding NaN or inf is refused in one line (FeatureStore.read), as training refuses it.
    A channel that barely varies gets a tenth of the typical (median non-zero) std
    instead of its own, so that a channel dead in training cannot be blown up on a new image.
    """
    if kind == "pooled":
        sample, per_image = rows, store.channels
    else:
        picks = np.linspace(0, len(rows) - 1, min(len(rows), STATISTICS_IMAGES)).round()
        sample = np.unique(rows[picks.astype(np.int64)])
        per_image = store.grid[0] * store.grid[1] * store.channels
    chunk = max(1, _STATISTICS_CHUNK_BYTES // (8 * per_image))
    count, total, squares = 0, 0.0, 0.0
    with progress_bar(progress, "feature statistics", len(sample), unit="img") as display:
        for start in range(0, len(sample), chunk):
            values = store.read(kind, sample[start : start + chunk])
            display.update(len(values))
            values = values.reshape(-1, values.shape[-1]).astype(np.float64)
            count += len(values)
            total = total + values.sum(0)
            squares = squares + np.einsum("ij,ij->j", values, values)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    varying = std[std > 0]
    typical = float(np.median(varying)) if len(varying) else 1.0
    return torch.from_numpy(mean).float(), torch.from_numpy(np.maximum(std, 0.1 * typical)).float()


def feature_stream(
    store: FeatureStore,
    corpus: Corpus,
    vocabulary: Vocabulary,
    rows: np.ndarray,
    max_length: int,
    reading: StreamConfig,
) -> FeatureStream:
    """The images `rows` of `store` with their captions (at most `max_length` words), read as
    `reading` says: `training_reading` or `validation_reading`."""
    captions = encode_captions(corpus, vocabulary, rows.tolist(), max_length)
    return FeatureStream(store, rows, captions, reading)


def training_reading(
    config: TrainConfig, kind: str, device: torch.device, ranks: Ranks
) -> StreamConfig:
    """This rank's part of the training images, shuffled anew every epoch."""
    return replace(
        _stream_config(config, kind, device),
        captions_per_image=config.captions_per_image,
        shuffle=True,
        # Only the attention models run every caption of a batch to its longest.
        bucket_by_length=config.bucket_by_length and kind == "spatial",
        rank=ranks.rank,
        world_size=ranks.world_size,
    )


def validation_reading(config: TrainConfig, kind: str, device: torch.device) -> StreamConfig:
    """Every validation image with all its captions, in row order."""
    return _stream_config(config, kind, device)


# Reader threads by default where a step runs on an accelerator: reading 14x14x2048 maps scales
# with threads (bench/reader.py), and a GPU step needs over 1,000 maps/s.
ACCELERATOR_READERS = 4


def reader_threads(workers: int | None, device: torch.device) -> tuple[int, str]:
    """The threads that read and assemble batches ahead of a step on `device` (`workers`, the
    --workers option, when given), and why that many.

    On a CPU one thread reads ahead only where the step leaves a CPU idle: PyTorch's threads
    spin between operations on the CPUs they hold, and a reader that takes one of those CPUs
    from them stalls every operation it lands in. On 2 cores held by the step's 2 threads, the
    demo-sized attention decoder trained from a 20,000-image store at about half the captions/s
    with one reader thread as reading in the loop, where it waited for data 8 % of its time; it
    never ran faster with the reader (bench/RESULTS.md [reader])."""
    if workers is not None:
        return workers, "--workers"
    if device.type != "cpu":
        return default_workers(ACCELERATOR_READERS), f"the default on {device.type}"
    cpus, step_threads = available_cpus(), torch.get_num_threads()
    if step_threads >= cpus:
        return 0, (
            f"the default on a CPU whose {cpus} CPUs the step's {step_threads} threads hold:"
            " a reader would stall them"
        )
    return 1, f"the default on a CPU: the step's {step_threads} threads leave a CPU of {cpus}"


def check_preload_device(preload: str, device: torch.device) -> None:
    """Refuse in one line to hold the maps in GPU memory when training runs elsewhere."""
    if preload == "gpu" and device.type != "cuda":
        raise CaptionerError(
            f"--preload gpu: training runs on {device.type}, not on a CUDA GPU; hold the maps in"
            " RAM with --preload ram"
        )


def describe_reading(stream: FeatureStream, why: str) -> str:
    """The line a run starts with about how the training features reach the step."""
    config = stream.config
    if stream.held_bytes:
        where = "GPU memory" if config.preload_device is not None else "RAM"
        held = f"{config.kind} features held in {where} ({format_bytes(stream.held_bytes)})"
    else:
        held = f"{config.kind} maps streamed by whole shards"
    if config.workers == 0:
        ahead = "read in the training loop"
    else:
        threads = "thread" if config.workers == 1 else "threads"
        ahead = f"{config.workers} reader {threads}, {config.prefetch} batches ahead"
    pinned = ", pinned for non-blocking copies" if config.pin_memory else ""
    return f"data: {held}; {ahead}{pinned} ({why})"


def _stream_config(config: TrainConfig, kind: str, device: torch.device) -> StreamConfig:
    """What both streams share: batch size, feature reading and where batches go."""
    return StreamConfig(
        kind=kind,
        batch_size=config.batch_size,
        shuffle=False,
        preload=config.preload != "none",
        preload_device=device if config.preload == "gpu" else None,
        workers=reader_threads(config.workers, device)[0],
        seed=config.seed,
        # Half-precision maps cross to a GPU at half the bytes; the decoders upcast them there.
        dtype=torch.float16 if device.type == "cuda" and kind == "spatial" else torch.float32,
        pin_memory=device.type == "cuda",
    )
