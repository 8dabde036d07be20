"""Phase-2 benchmarks (issue 4 (a), (b), (d)), each measured against its baseline in one run.

(a) epoch time: decoder training from the feature store vs the same decoder with the frozen
    ResNet-152 (448 px, images decoded from JPEG) in the loop, for both models, against two
    baselines: the CNN run once per (image, caption) sample, as the common tutorials do, and
    the CNN run once per image for all of its captions.
(b) data wait: the share of a training step spent waiting for the feature stream, measured in
    a loop that does what captioner.train does each step; plus how fast the stream alone delivers
    batches (what a much faster GPU step would need).
(d) read throughput: spatial maps read from the store (zstd-compressed shards, decoded) vs the
    same bytes read raw from a .npy file, warm (page cache) and cold (pages dropped with
    posix_fadvise).

A full Flickr8k epoch on this shared 2-core CPU would take hours with the CNN in the loop, so
every figure is a median of a few repetitions of one STEP (or one image) and the epoch times
are EXTRAPOLATED to Flickr8k's train split (6000 images, 30000 captions, 1000 steps of 6 images
x 5 captions = batch size 32): the printout says so next to each number.

The CNN uses random weights (weights=none): the same architecture and FLOPs as the ImageNet
weights, which cannot be downloaded here. The store holds 128 images of synthetic post-ReLU
feature maps (14x14x2048 float16, about half zeros like a ResNet's last block) with real Flickr8k
captions; its JPEGs are the 10 real Flickr8k images in ../shared/fixtures.

    OMP_NUM_THREADS=1 python bench/train.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.batches import Batch, FeatureStream, StreamConfig, encode_captions  # noqa: E402
from captioner.corpus import read_corpus  # noqa: E402
from captioner.encoder import EncoderConfig, build_encoder, image_transform  # noqa: E402
from captioner.images import load_image  # noqa: E402
from captioner.models import DecoderConfig, build_decoder  # noqa: E402
from captioner.store import FeatureStore, StoreSettings, create_store, directory_size  # noqa: E402
from captioner.text import Vocabulary  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "flickr8k"
FLICKR8K_TRAIN_IMAGES, CAPTIONS_PER_IMAGE, BATCH_SIZE = 6000, 5, 32
IMAGES_PER_STEP = BATCH_SIZE // CAPTIONS_PER_IMAGE  # 6 images, 30 captions: what training uses
STEPS_PER_EPOCH = FLICKR8K_TRAIN_IMAGES // IMAGES_PER_STEP
STORE_IMAGES, GRID, CHANNELS = 128, (14, 14), 2048
MODELS = ("show-tell", "show-attend-tell")


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def show(label: str, times: list[float], unit: float = 1.0, suffix: str = "s") -> float:
    value = statistics.median(times) * unit
    each = ", ".join(f"{t * unit:.3g}" for t in times)
    print(f"  {label:<58} {value:10.4g} {suffix}  (each: {each})")
    return statistics.median(times)


# ---- setup -----------------------------------------------------------------------------------


def build_store(path: Path, compression: str = "zstd") -> tuple[FeatureStore, Vocabulary]:
    """128 images of synthetic post-ReLU maps with real Flickr8k captions, in the store format
    (the same numbers whatever the compression)."""
    corpus = read_corpus([FIXTURES / "captions.txt"])
    vocabulary = Vocabulary.build(corpus.tokens_of_split("train"), min_count=5)
    corpus = corpus.subset(list(range(STORE_IMAGES)))
    settings = StoreSettings(
        encoder=EncoderConfig("resnet152", "none", 448), weights_id="bench",
        weights_checksum="bench", grid=GRID, channels=CHANNELS, compression=compression,
    )  # fmt: skip
    writer = create_store(path, corpus, settings)
    rng = np.random.default_rng(0)
    for shard in range(writer.num_shards):
        rows = writer.shard_rows(shard)
        maps = np.maximum(rng.normal(size=(len(rows), GRID[0] * GRID[1], CHANNELS)), 0)
        maps = maps.astype(np.float16)
        writer.write_shard(shard, maps, maps.astype(np.float32).mean(1), {})
    return FeatureStore.open(path), vocabulary


def stream_of(store: FeatureStore, vocabulary: Vocabulary, kind: str, workers: int = 2):
    corpus = store.corpus()
    rows = np.arange(store.num_images)
    captions = encode_captions(corpus, vocabulary, rows.tolist(), max_length=20)
    config = StreamConfig(kind=kind, batch_size=BATCH_SIZE, workers=workers, window_shards=2)
    return FeatureStream(store, rows, captions, config)


class Trainer:
    """One training step exactly as captioner.train takes it (loss, backward, clip, Adam)."""

    def __init__(self, model: str, vocabulary: Vocabulary) -> None:
        torch.manual_seed(0)
        self.decoder = build_decoder(DecoderConfig(model, len(vocabulary), CHANNELS))
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=4e-4)

    def step(self, batch: Batch) -> None:
        output = self.decoder.training_loss(
            batch.features, batch.image_index, batch.captions, batch.lengths, 0.1, 1.0
        )
        self.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.decoder.parameters(), 5.0)
        self.optimizer.step()


# ---- (a) epoch time --------------------------------------------------------------------------


def measure_cnn(repeats: int) -> tuple[float, float]:
    """Seconds per image: JPEG decode + resize to 448 px; ResNet-152 forward at 448 px."""
    config = EncoderConfig("resnet152", "none", 448)
    transform = image_transform(config)
    paths = sorted((FIXTURES / "images").glob("*.jpg"))
    decode_times = []
    for _ in range(repeats):
        for path in paths:
            started = time.perf_counter()
            transform(load_image(path))
            decode_times.append(time.perf_counter() - started)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the FLOPs are what is measured here
        encoder = build_encoder(config)
    images = torch.stack([transform(load_image(p)) for p in paths[:2]])
    with torch.inference_mode():
        cnn_times = median_seconds(lambda: encoder(images), repeats)
    print(f"(a) per-image costs of the CNN in the loop ({len(paths)} real Flickr8k JPEGs):")
    decode = show("JPEG decode + resize to 448 px, per image", decode_times, 1e3, "ms")
    cnn = show("ResNet-152 forward at 448 px, per image (batch of 2)", cnn_times, 1e3 / 2, "ms")
    return decode, cnn / 2


def measure_steps(store, vocabulary, repeats: int) -> dict[str, float]:
    """Seconds per training step from the store's features, 6 images x 5 captions."""
    print(f"    decoder training step, {IMAGES_PER_STEP} images x {CAPTIONS_PER_IMAGE} captions,"
          f" embed = hidden = attention = 512, vocabulary {len(vocabulary)}:")  # fmt: skip
    steps = {}
    for model in MODELS:
        kind = "pooled" if model == "show-tell" else "spatial"
        batch = next(iter(stream_of(store, vocabulary, kind, workers=0).epoch(0)))
        step = Trainer(model, vocabulary).step
        times = median_seconds(lambda: step(batch), repeats * (5 if kind == "pooled" else 1))  # noqa: B023
        steps[model] = show(f"{model} step", times, 1e3, "ms")
    return steps


def report_epochs(decode: float, cnn: float, steps: dict, waits: dict) -> None:
    images_per_epoch = FLICKR8K_TRAIN_IMAGES
    samples_per_epoch = FLICKR8K_TRAIN_IMAGES * CAPTIONS_PER_IMAGE
    print(
        f"(a) Flickr8k epoch EXTRAPOLATED from the medians above ({STEPS_PER_EPOCH} steps,"
        f" {images_per_epoch} images, {samples_per_epoch} captions; decoder step the same in all"
        " three, which favours the baselines):"
    )
    per_image_cnn = decode + cnn
    for model in MODELS:
        ours = STEPS_PER_EPOCH * steps[model] / (1 - waits[model])
        decoder = STEPS_PER_EPOCH * steps[model]
        once_per_image = decoder + images_per_epoch * per_image_cnn
        once_per_sample = decoder + samples_per_epoch * per_image_cnn
        print(f"  {model}:")
        print(f"    from the store (ours)                         {hours(ours)}")
        print(f"    CNN once per image, all its captions          {hours(once_per_image)}"
              f"   ours is {once_per_image / ours:7.1f}x faster")  # fmt: skip
        print(f"    CNN once per (image, caption) sample          {hours(once_per_sample)}"
              f"   ours is {once_per_sample / ours:7.1f}x faster")  # fmt: skip


def hours(seconds: float) -> str:
    return f"{seconds:9.0f} s = {seconds / 3600:6.2f} h"


# ---- (b) data wait ---------------------------------------------------------------------------


def measure_data_wait(store, vocabulary, steps_to_run: dict[str, int]) -> dict[str, float]:
    """Share of each step's wall time spent in next(batches), in a real loop over the store."""
    print("(b) data wait in the training loop (stream: spatial maps streamed from whole shards"
          " by 2 threads, pooled vectors from RAM):")  # fmt: skip
    waits = {}
    for model, count in steps_to_run.items():
        kind = "pooled" if model == "show-tell" else "spatial"
        trainer = Trainer(model, vocabulary)
        stream = stream_of(store, vocabulary, kind)
        count = min(count, stream.num_batches - 1)
        batches = stream.epoch(1)
        trainer.step(next(batches))  # warm-up (first-call allocations)
        wait, total = 0.0, 0.0
        for _ in range(count):
            started = time.perf_counter()
            batch = next(batches)
            waited = time.perf_counter() - started
            trainer.step(batch)
            wait, total = wait + waited, total + time.perf_counter() - started
        waits[model] = wait / total
        print(f"  {model:<18} {count} steps: waited {wait * 1e3:.1f} ms of {total * 1e3:.0f} ms"
              f" = {100 * waits[model]:.2f}% of the step time (target <= 5%)")  # fmt: skip
    for kind in ("spatial", "pooled"):
        stream = stream_of(store, vocabulary, kind)
        started = time.perf_counter()
        count = sum(1 for _ in stream.epoch(2))
        per_batch = (time.perf_counter() - started) / count
        print(f"  the {kind} stream alone delivers a batch every {per_batch * 1e3:.2f} ms"
              f" ({IMAGES_PER_STEP / per_batch:.0f} images/s): steps of at least"
              f" {per_batch / 0.05 * 1e3:.0f} ms wait under 5% even with no overlap")  # fmt: skip
    return waits


# ---- (d) read throughput ---------------------------------------------------------------------


def drop_from_page_cache(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_reads(stores: dict[str, FeatureStore], raw: Path, repeats: int) -> None:
    """Decoded MB/s of whole-store reads (all rows: whole shards) vs np.load of the same array."""
    rows = np.arange(next(iter(stores.values())).num_images)
    maps = next(iter(stores.values())).read_spatial(rows)
    np.save(raw, maps)
    readers = {
        f"store, {name} ({directory_size(store.path / 'spatial') / 1e6:.0f} MB)": (
            store.path,
            lambda store=store: store.read_spatial(rows),
        )
        for name, store in stores.items()
    }
    readers[f"raw .npy, np.load ({raw.stat().st_size / 1e6:.0f} MB)"] = (raw, lambda: np.load(raw))
    print(f"(d) read {len(rows)} spatial maps ({maps.nbytes / 1e6:.0f} MB decoded), MB/s decoded:")
    map_megabytes = maps.nbytes / len(rows) / 1e6
    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(repeats):  # alternate, so load drift hits all alike
        for temperature in ("warm", "cold"):
            for name, (path, read) in readers.items():
                if temperature == "cold":
                    drop_from_page_cache(path)
                started = time.perf_counter()
                read()
                elapsed = time.perf_counter() - started
                results.setdefault(temperature, {}).setdefault(name, []).append(elapsed)
    for temperature, by_reader in results.items():
        raw_rate = maps.nbytes / statistics.median(by_reader[list(readers)[-1]]) / 1e6
        for name, times in by_reader.items():
            rates = [maps.nbytes / t / 1e6 for t in times]
            rate = statistics.median(rates)
            print(f"  {temperature}  {name:<34} {rate:7.0f} MB/s = {rate / raw_rate:5.2f} x raw"
                  f"  ({rate / map_megabytes:.0f} maps/s; each: "
                  + ", ".join(f"{x:.0f}" for x in rates) + ")")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention-steps", type=int, default=6, help="steps timed for (b)")
    args = parser.parse_args()
    if not (FIXTURES / "captions.txt").is_file():
        sys.exit(f"needs the Flickr8k fixtures at {FIXTURES}")
    print(f"cpu, torch threads {torch.get_num_threads()}, torch {torch.__version__},"
          f" load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        store, vocabulary = build_store(Path(scratch) / "bench.zarr")
        decode, cnn = measure_cnn(args.repeats)
        steps = measure_steps(store, vocabulary, args.repeats)
        waits = measure_data_wait(
            store, vocabulary, {"show-tell": 20, "show-attend-tell": args.attention_steps}
        )
        report_epochs(decode, cnn, steps, waits)
        stores = {"zstd (default)": store}
        for compression in ("blosc-lz4", "none"):
            stores[compression] = build_store(Path(scratch) / f"{compression}.zarr", compression)[0]
        measure_reads(stores, Path(scratch) / "raw.npy", args.repeats)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
