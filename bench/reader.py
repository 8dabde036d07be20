"""The feature reader: how fast it delivers spatial maps, and how long a training step waits for it.

(a) The reader alone: the training stream (captioner.training.batches.FeatureStream, as a GPU run
    configures it: float16 batches, whole shards, no step consuming them) over a generated store
    of 14x14x2048 float16 post-ReLU maps (about half zeros, as a ResNet's last block), with 1, 2
    and 4 reader threads: maps/s, and the ratio to one thread. The baseline: one thread of the
    same stream with zarr decoding each shard chunk by chunk (captioner.zarr_rows says why it
    no longer does). Amdahl's law fitted to the 1- and
    2-thread rates extrapolates to the threads of a GPU node; on a machine with fewer cores than
    threads the extra threads cannot help, so the fit is the honest figure.
(b) Data wait: the demo's attention decoder (captioner demo's sizes, batch of 50 captions, one
    caption per image) trained over a generated store of 20,000 images of 3x3x128 maps (the tiny
    encoder's; tests/factories.py's make_store), reading in the training loop (--workers 0) and
    with one reader thread (--workers 1), each with the shard decoder and with zarr's
    chunk-by-chunk decoding (the baseline); the line after says which one
    captioner.training.data.reader_threads picks here. Each measures the first
    --steps batches of an epoch (shards are shuffled, so any stretch of an epoch is alike): the
    share of the loop's time spent waiting for the next batch, and captions/s. The settings
    alternate, so load drift hits them alike.

    python bench/reader.py [--maps 512] [--threads 1 2 4] [--images 20000] [--steps 150]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from factories import make_corpus, make_store  # noqa: E402
from machine import describe_machine  # noqa: E402  (bench/machine.py)
from train import write_post_relu_maps  # noqa: E402  (bench/train.py)

from captioner.devices import available_cpus  # noqa: E402
from captioner.distributed import Ranks  # noqa: E402
from captioner.encoder import EncoderConfig  # noqa: E402
from captioner.models import build_decoder, load_native_attention  # noqa: E402
from captioner.store import FeatureStore, StoreSettings, create_store, split_rows  # noqa: E402
from captioner.text import Vocabulary  # noqa: E402
from captioner.training import TrainConfig  # noqa: E402
from captioner.training.batches import FeatureStream, StreamConfig, encode_captions  # noqa: E402
from captioner.training.config import checked_config, decoder_config  # noqa: E402
from captioner.training.data import (  # noqa: E402
    feature_statistics,
    feature_stream,
    reader_threads,
    training_reading,
)
from captioner.training.objectives import CrossEntropy  # noqa: E402

GRID, CHANNELS = (14, 14), 2048
GPU_NODE_THREADS = (8, 16)
# captioner demo's attention decoder (captioner.demo.DemoConfig) and its batches.
DEMO = dict(
    embed_size=128, hidden_size=256, attention_size=128, dropout=0.3, lr=3e-3, alpha_c=0.0,
    batch_size=50, captions_per_image=1, min_count=1,
)  # fmt: skip


# ---- (a) the reader alone --------------------------------------------------------------------


def build_large_store(path: Path, maps: int) -> FeatureStore:
    """`maps` images of synthetic post-ReLU 14x14x2048 float16 maps, one caption each."""
    settings = StoreSettings(
        encoder=EncoderConfig("resnet152", "none", 448),
        weights_id="bench",
        weights_checksum="bench",
        grid=GRID,
        channels=CHANNELS,
    )
    write_post_relu_maps(create_store(path, make_corpus(maps, 1, (1, 0, 0)), settings))
    return FeatureStore.open(path)


def gpu_stream(store: FeatureStore, threads: int) -> FeatureStream:
    """The training stream a GPU run reads (float16 batches of 16 images), without the pinning
    that needs a GPU."""
    corpus = store.corpus()
    vocabulary = Vocabulary.build(corpus.tokens_of_split("train"), min_count=1)
    rows = np.arange(store.num_images)
    captions = encode_captions(corpus, vocabulary, rows.tolist(), max_length=20)
    config = StreamConfig(
        kind="spatial", batch_size=16, workers=threads, dtype=torch.float16, seed=0
    )
    return FeatureStream(store, rows, captions, config)


def zarr_decoding(store: FeatureStore) -> FeatureStore:
    """The same store with every shard decoded by zarr, chunk by chunk: the baseline."""
    baseline = FeatureStore.open(store.path)
    baseline._spatial_shards = None
    return baseline


def measure_reader(store: FeatureStore, threads_tried: list[int], repeats: int) -> None:
    streams = {threads: gpu_stream(store, threads) for threads in threads_tried}
    baseline = gpu_stream(zarr_decoding(store), 1)
    rates: dict[int, list[float]] = {threads: [] for threads in threads_tried}
    baseline_rates: list[float] = []
    cpu_per_map: list[float] = []  # process CPU seconds a map, whatever other jobs take
    for repeat in range(repeats + 1):  # the first round warms the page cache
        for threads, stream in [*streams.items(), (0, baseline)]:
            started, cpu_started = time.perf_counter(), time.process_time()
            maps = sum(len(batch.rows) for batch in stream.epoch(repeat))
            rate = maps / (time.perf_counter() - started)
            if repeat and stream is baseline:
                baseline_rates.append(rate)
            elif repeat:
                rates[threads].append(rate)
                cpu_per_map.append((time.process_time() - cpu_started) / maps)
    one = statistics.median(rates[1])
    print(
        f"(a) the reader alone: {store.num_images} maps of 14x14x2048 float16 in"
        f" {store.num_images // store.images_per_shard} shards, float16 batches of 16 images:"
    )
    for threads, each in rates.items():
        rate = statistics.median(each)
        print(
            f"  {threads} reader thread{'s' if threads > 1 else ' '}  {rate:7.0f} maps/s"
            f"  {rate / one:5.2f}x one thread  (each: {', '.join(f'{r:.0f}' for r in each)})"
        )
    rate = statistics.median(baseline_rates)
    print(
        f"  baseline: 1 thread, zarr decoding {rate:7.0f} maps/s; the shard decoder is"
        f" {one / rate:.2f}x it  (each: {', '.join(f'{r:.0f}' for r in baseline_rates)})"
    )
    speedup = statistics.median(rates[2]) / one
    parallel = min(max(2 * (1 - 1 / speedup), 0.0), 1.0)  # Amdahl: s(2) = 1 / (1 - p + p/2)
    print(
        f"  Amdahl fit of 1 -> 2 threads: parallel share {parallel:.2f}; on a node with free"
        " cores that predicts "
        + ", ".join(
            f"{one / (1 - parallel + parallel / n):.0f} maps/s at {n} threads"
            for n in GPU_NODE_THREADS
        )
        + f" (this machine has {available_cpus()} CPUs)"
    )
    cpu = statistics.median(cpu_per_map)
    print(
        f"  CPU time a map (all threads, immune to other jobs' load): {cpu * 1e3:.2f} ms, so"
        f" {1 / cpu:.0f} maps/s per free core; "
        + ", ".join(f"{n / cpu:.0f} maps/s at {n} cores" for n in GPU_NODE_THREADS)
        + " if the work spreads over them"
    )


# ---- (b) data wait ---------------------------------------------------------------------------


class Step:
    """A cross-entropy training step as captioner.training.loop takes it on a CPU: the demo's
    attention decoder with the compiled attention scores, loss, backward, clipping, fused Adam."""

    def __init__(self, config: TrainConfig, store: FeatureStore, vocabulary: Vocabulary, rows):
        torch.manual_seed(0)
        self.decoder = build_decoder(
            decoder_config(config, len(vocabulary), store.channels, store.grid)
        )
        self.decoder.set_feature_statistics(*feature_statistics(store, rows, "spatial"))
        load_native_attention(self.decoder, store.grid[0] * store.grid[1], torch.device("cpu"))
        self.objective = CrossEntropy(self.decoder, config.label_smoothing, config.alpha_c)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=config.lr, fused=True)

    def __call__(self, batch) -> None:
        output = self.objective(batch)
        self.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.decoder.parameters(), 5.0)
        self.optimizer.step()


def measure_data_wait(path: Path, steps: int, repeats: int) -> None:
    store = FeatureStore.open(path)
    corpus = store.corpus()
    rows = split_rows(corpus, store, "train")
    config = checked_config(TrainConfig(features=path, out=path.parent / "run", **DEMO))
    vocabulary = Vocabulary.build(corpus.tokens_of_split("train"), config.min_count)
    cpu = torch.device("cpu")
    default, why = reader_threads(None, cpu)
    settings = {
        "reading in the loop (--workers 0)": (store, 0),
        "one reader thread (--workers 1)": (store, 1),
        "in the loop, zarr decoding (baseline)": (zarr_decoding(store), 0),
        "one reader thread, zarr decoding (baseline)": (zarr_decoding(store), 1),
    }
    streams = {
        name: feature_stream(
            read_from,
            corpus,
            vocabulary,
            rows,
            config.max_length,
            training_reading(replace(config, workers=workers), "spatial", cpu, Ranks()),
        )
        for name, (read_from, workers) in settings.items()
    }
    step = Step(config, store, vocabulary, rows)
    step(next(iter(streams[next(iter(streams))].epoch(0))))  # first-call allocations
    waits: dict[str, list[float]] = {name: [] for name in streams}
    speeds: dict[str, list[float]] = {name: [] for name in streams}
    for repeat in range(repeats):
        for name, stream in streams.items():
            batches = stream.epoch(1 + repeat)
            waited, captions, started = 0.0, 0, time.perf_counter()
            for _ in range(min(steps, stream.num_batches)):
                asked = time.perf_counter()
                batch = next(batches)
                waited += time.perf_counter() - asked
                step(batch)
                captions += batch.num_captions
            batches.close()
            elapsed = time.perf_counter() - started
            waits[name].append(waited / elapsed)
            speeds[name].append(captions / elapsed)
    print(
        f"(b) data wait of the demo's attention decoder over {store.num_images} images of 3x3x128"
        f" maps ({len(rows)} train), first {steps} batches of {config.batch_size} captions of an"
        " epoch; goal <= 5%:"
    )
    for name in streams:
        each = ", ".join(f"{100 * w:.1f}%" for w in waits[name])
        print(
            f"  {name:<48} data wait {100 * statistics.median(waits[name]):5.1f}%"
            f"  {statistics.median(speeds[name]):6.1f} captions/s  (each: {each})"
        )
    print(f"  the default here: --workers {default} ({why})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=512, help="(a): 14x14x2048 maps in the store")
    parser.add_argument("--images", type=int, default=20000, help="(b): images in the store")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4], help="(a)")
    parser.add_argument("--steps", type=int, default=150, help="(b): batches measured")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(describe_machine())
    print(
        f"torch threads {torch.get_num_threads()}, torch {torch.__version__},"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        large = build_large_store(Path(scratch) / "large.zarr", args.maps)
        measure_reader(large, sorted({1, 2, *args.threads}), args.repeats)
        small = make_store(
            Path(scratch) / "small.zarr",
            images=args.images,
            captions_per_image=5,
            grid=(3, 3),
            channels=128,
            images_per_shard=64,
            split_fractions=(0.8, 0.1, 0.1),
        )
        measure_data_wait(small, args.steps, args.repeats)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
