"""Phase-2 benchmarks, each measured against its baseline in one run.

(a) training throughput and epoch time: both decoders trained over the feature store in a loop
    that does what captioner.training.loop does each step (stream with data wait, loss, backward,
    clip, Adam), ours against the layer-by-layer reference step (tests/plain_decoders.py,
    unbucketed batches read by 2 threads, foreach Adam) in steady-state captions/s;
    then a Flickr8k epoch from the store against the same decoder with the frozen ResNet-152
    (448 px, images decoded from JPEG) in the loop, run once per image for all its captions, or
    once per (image, caption) sample as the common tutorials do.
(b) data wait: the share of the loop's time spent waiting for the feature stream, and how fast the
    stream alone delivers batches (what a much faster GPU step would need).
(d) read throughput: spatial maps read from the store (zstd-compressed shards, decoded) vs the
    same bytes read raw from a .npy file, warm (page cache) and cold (pages dropped with
    posix_fadvise).

A Flickr8k epoch on a CPU would take hours with the CNN in the loop, so the CNN's costs are medians
of a few images and the epoch times are EXTRAPOLATED to Flickr8k's train split (6000 images,
30000 captions): the printout says so next to each number. The decoder loop runs train_decoder.py's
default options (sizes 512, --batch-size 80: 16 images x 5 captions; the reference step at
--batch-size 32, the default before the fast step) over the whole store.

The CNN uses random weights (weights=none): the same architecture and FLOPs as the ImageNet
weights, which cannot be downloaded here. The store holds 128 images of synthetic post-ReLU
feature maps (14x14x2048 float16, about half zeros like a ResNet's last block) with real Flickr8k
captions; its JPEGs are the 10 real Flickr8k images in ../shared/fixtures.

    python bench/train.py [--device cpu|cuda] [--repeats 3]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from machine import describe_machine  # noqa: E402  (bench/machine.py)
from plain_decoders import PlainShowAttendTell, PlainShowTell  # noqa: E402

from captioner.encoder import EncoderConfig, build_encoder, image_transform  # noqa: E402
from captioner.images import load_image  # noqa: E402
from captioner.models import DecoderConfig, build_decoder, load_native_attention  # noqa: E402
from captioner.precision import ENCODER, resolve_precision  # noqa: E402
from captioner.readers import read_corpus  # noqa: E402
from captioner.store import (  # noqa: E402
    FeatureStore,
    StoreSettings,
    StoreWriter,
    create_store,
    directory_size,
)
from captioner.text import Vocabulary  # noqa: E402
from captioner.training import TrainConfig  # noqa: E402
from captioner.training.batches import Batch, FeatureStream, StreamConfig, encode_captions  # noqa: E402
from captioner.training.run import Amp  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "flickr8k"
FLICKR8K_TRAIN_IMAGES, CAPTIONS_PER_IMAGE = 6000, 5
REFERENCE_BATCH_SIZE = 32  # 6 images x 5 captions: train_decoder.py's default before the fast step
BATCH_SIZE = TrainConfig.batch_size  # train_decoder.py's default
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
        encoder=EncoderConfig("resnet152", "none", 448),
        weights_id="bench",
        weights_checksum="bench",
        grid=GRID,
        channels=CHANNELS,
        compression=compression,
    )
    write_post_relu_maps(create_store(path, corpus, settings))
    return FeatureStore.open(path), vocabulary


def write_post_relu_maps(writer: StoreWriter) -> None:
    """Fill every shard with synthetic post-ReLU float16 maps (about half zeros, as a ResNet's
    last block), seeded: the same numbers whatever the store's compression."""
    rng = np.random.default_rng(0)
    regions, channels = writer.settings.grid[0] * writer.settings.grid[1], writer.settings.channels
    for shard in range(writer.num_shards):
        rows = writer.shard_rows(shard)
        maps = np.maximum(rng.normal(size=(len(rows), regions, channels)), 0).astype(np.float16)
        writer.write_shard(shard, maps, maps.astype(np.float32).mean(1), {})


def stream_of(
    store: FeatureStore,
    vocabulary: Vocabulary,
    kind: str,
    workers: int = 2,
    bucket_by_length: bool = False,
    device: torch.device | None = None,
    batch_size: int = BATCH_SIZE,
) -> FeatureStream:
    """The stream captioner.training.data.training_reading makes for `device` (None: the CPU)."""
    cuda = device is not None and device.type == "cuda"
    corpus = store.corpus()
    rows = np.arange(store.num_images)
    captions = encode_captions(corpus, vocabulary, rows.tolist(), max_length=20)
    config = StreamConfig(
        kind=kind,
        batch_size=batch_size,
        workers=workers,
        window_shards=2,
        bucket_by_length=bucket_by_length,
        dtype=torch.float16 if cuda and kind == "spatial" else torch.float32,
        pin_memory=cuda,
    )
    return FeatureStream(store, rows, captions, config)


class Trainer:
    """One training step as captioner.training.loop takes it (loss, backward, clip, Adam), ours
    (with the compiled attention scores where train_decoder.py would load them) or the reference
    (the layer-by-layer steps of tests/plain_decoders.py with foreach Adam)."""

    def __init__(
        self,
        model: str,
        vocabulary: Vocabulary,
        device: torch.device,
        reference: bool,
    ):
        torch.manual_seed(0)
        config = DecoderConfig(model, len(vocabulary), CHANNELS)
        if reference:
            plain = PlainShowAttendTell if model == "show-attend-tell" else PlainShowTell
            self.decoder = plain(config).to(device)
        else:
            self.decoder = build_decoder(config).to(device)
            load_native_attention(
                self.decoder, GRID[0] * GRID[1], device
            )  # as train_decoder.py does
        fused = not reference and device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=4e-4, fused=fused)
        self.amp = Amp(resolve_precision("auto", device, model))
        self.device = device

    def step(self, batch: Batch) -> None:
        batch = batch.to(self.device)
        with self.amp.autocast():
            output = self.decoder.training_loss(
                batch.features, batch.image_index, batch.captions, batch.lengths, 0.1, 1.0
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.amp.scaler.scale(output.loss).backward()
        self.amp.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.decoder.parameters(), 5.0)
        self.amp.scaler.step(self.optimizer)
        self.amp.scaler.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---- (a) epoch time --------------------------------------------------------------------------


def measure_cnn(repeats: int, device: torch.device) -> tuple[float, float]:
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
        encoder = build_encoder(config).to_device(
            device, resolve_precision("auto", device, ENCODER)
        )
    batch = 2 if device.type == "cpu" else 32
    images = torch.stack([transform(load_image(p)) for p in paths[:2]] * (batch // 2)).to(device)

    def forward() -> None:
        encoder(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        cnn_times = median_seconds(forward, repeats)
    print(f"(a) per-image costs of the CNN in the loop ({len(paths)} real Flickr8k JPEGs):")
    decode = show("JPEG decode + resize to 448 px, per image", decode_times, 1e3, "ms")
    cnn = show(
        f"ResNet-152 forward at 448 px, per image (batch of {batch})", cnn_times, 1e3 / batch, "ms"
    )
    return decode, cnn / batch


def measure_training(
    store: FeatureStore, vocabulary: Vocabulary, repeats: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Steady-state captions/s of whole epochs over the store (data wait included, after one
    warm-up step) for each path, alternating: the reference step at its batch size, ours at that
    batch size, and ours at train_decoder.py's defaults."""
    print(
        f"(a) training over the store, {store.num_images} images with real Flickr8k captions,"
        f" sizes 512, vocabulary {len(vocabulary)}; captions/s of whole epochs, data wait"
        f" included (ours: share of the loop spent waiting for data, target <= 5%):"
    )
    ours_workers = 0 if device.type == "cpu" else 2  # as captioner.training.data's streams
    rates: dict[str, dict[str, float]] = {}
    for model in MODELS:
        kind = "pooled" if model == "show-tell" else "spatial"
        paths = {  # name: (the reference step?, stream)
            "reference": (
                True,
                stream_of(
                    store,
                    vocabulary,
                    kind,
                    workers=2,
                    device=device,
                    batch_size=REFERENCE_BATCH_SIZE,
                ),
            ),
            f"ours, batch {REFERENCE_BATCH_SIZE}": (
                False,
                stream_of(
                    store, vocabulary, kind, ours_workers, False, device, REFERENCE_BATCH_SIZE
                ),
            ),
            "ours": (False, stream_of(store, vocabulary, kind, ours_workers, False, device)),
        }
        if kind == "spatial":  # --bucket-by-length (the attention model's option)
            paths["ours, bucketed"] = (
                False,
                stream_of(store, vocabulary, kind, ours_workers, True, device),
            )
        trainers = {
            name: Trainer(model, vocabulary, device, reference)
            for name, (reference, _) in paths.items()
        }
        for name, (_, stream) in paths.items():  # warm-up (first-call allocations)
            trainers[name].step(next(iter(stream.epoch(0))))
        times: dict[str, list[float]] = {name: [] for name in paths}
        waits: dict[str, list[float]] = {name: [] for name in paths}
        for repeat in range(repeats):
            for name, (_, stream) in paths.items():
                captions, waited, started = 0, 0.0, time.perf_counter()
                batches = stream.epoch(1 + repeat)
                while True:
                    asked = time.perf_counter()
                    batch = next(batches, None)
                    waited += time.perf_counter() - asked
                    if batch is None:
                        break
                    trainers[name].step(batch)
                    captions += batch.num_captions
                elapsed = time.perf_counter() - started
                times[name].append(captions / elapsed)
                waits[name].append(waited / elapsed)
        rates[model] = {name: statistics.median(values) for name, values in times.items()}
        for name, (_, stream) in paths.items():
            each = ", ".join(f"{v:.1f}" for v in times[name])
            label = f"{name} (--batch-size {stream.config.batch_size})"
            if stream.config.bucket_by_length:
                label = f"ours (--batch-size {stream.config.batch_size} --bucket-by-length)"
            wait = 100 * statistics.median(waits[name])
            print(
                f"  {model:<17} {label:<44} {rates[model][name]:7.1f} captions/s,"
                f" {rates[model][name] / rates[model]['reference']:5.2f}x the reference,"
                f" data wait {wait:4.1f}%  (each: {each})"
            )
    return rates


def report_epochs(decode: float, cnn: float, rates: dict[str, dict[str, float]]) -> None:
    images_per_epoch = FLICKR8K_TRAIN_IMAGES
    samples_per_epoch = FLICKR8K_TRAIN_IMAGES * CAPTIONS_PER_IMAGE
    print(
        f"(a) Flickr8k epoch EXTRAPOLATED ({images_per_epoch} images, {samples_per_epoch}"
        " captions) from the captions/s above and the CNN's per-image costs; the decoder's own"
        " time is ours in all three, which favours the baselines:"
    )
    per_image_cnn = decode + cnn
    for model in MODELS:
        ours = samples_per_epoch / rates[model]["ours"]
        reference = samples_per_epoch / rates[model]["reference"]
        once_per_image = ours + images_per_epoch * per_image_cnn
        once_per_sample = ours + samples_per_epoch * per_image_cnn
        print(f"  {model}:")
        print(f"    from the store (ours)                         {hours(ours)}")
        print(f"    from the store (reference step)               {hours(reference)}")
        print(
            f"    CNN once per image, all its captions          {hours(once_per_image)}"
            f"   ours is {once_per_image / ours:7.1f}x faster"
        )
        print(
            f"    CNN once per (image, caption) sample          {hours(once_per_sample)}"
            f"   ours is {once_per_sample / ours:7.1f}x faster"
        )


def hours(seconds: float) -> str:
    return f"{seconds:9.0f} s = {seconds / 3600:6.2f} h"


# ---- (b) data wait ---------------------------------------------------------------------------


def measure_stream_alone(store: FeatureStore, vocabulary: Vocabulary) -> None:
    """How often each stream delivers a batch with no training step consuming it."""
    print(
        "(b) the streams alone (spatial maps streamed from whole shards by 2 threads, pooled"
        " vectors from RAM):"
    )
    for kind in ("spatial", "pooled"):
        stream = stream_of(store, vocabulary, kind)
        started = time.perf_counter()
        count = sum(1 for _ in stream.epoch(2))
        per_batch = (time.perf_counter() - started) / count
        print(
            f"  the {kind} stream alone delivers a batch every {per_batch * 1e3:.2f} ms"
            f" ({stream.images_per_batch / per_batch:.0f} images/s): steps of at least"
            f" {per_batch / 0.05 * 1e3:.0f} ms wait under 5% even with no overlap"
        )


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
            print(
                f"  {temperature}  {name:<34} {rate:7.0f} MB/s = {rate / raw_rate:5.2f} x raw"
                f"  ({rate / map_megabytes:.0f} maps/s; each: "
                + ", ".join(f"{x:.0f}" for x in rates)
                + ")"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(describe_machine())
    device = torch.device(args.device)
    if not (FIXTURES / "captions.txt").is_file():
        sys.exit(f"needs the Flickr8k fixtures at {FIXTURES}")
    print(
        f"{device}, torch threads {torch.get_num_threads()}, torch {torch.__version__},"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        store, vocabulary = build_store(Path(scratch) / "bench.zarr")
        decode, cnn = measure_cnn(args.repeats, device)
        rates = measure_training(store, vocabulary, args.repeats, device)
        report_epochs(decode, cnn, rates)
        measure_stream_alone(store, vocabulary)
        stores = {"zstd (default)": store}
        for compression in ("blosc-lz4", "none"):
            stores[compression] = build_store(Path(scratch) / f"{compression}.zarr", compression)[0]
        measure_reads(stores, Path(scratch) / "raw.npy", args.repeats)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
