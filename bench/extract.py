"""Phase-1 benchmarks, each against its baseline in one run.

pipeline: `extract_features` (JPEG decode + resize in DataLoader workers, CNN, background shard
    writer) against the bare encoder forward over ready-made tensors, same device, encoder and
    batch size. The bare forward runs at each precision (float32 without and with channels-last,
    what --precision auto chooses, bfloat16 where the device has it) and the pipeline at auto's.
    Repetitions alternate between them so load drift on a shared machine hits all; prints median
    images/s of each, each precision's ratio to float32, and pipeline / bare forward at auto's
    precision (the target is >= 0.90).
storage: layouts of the `spatial` array (inner chunk, shard size, compressor) over realistic
    feature maps: size on disk, write speed, and read throughput of 64 images (random rows, and
    one aligned run), warm (page cache) and cold (pages dropped with posix_fadvise), through the
    store's reader (runs of rows as slices) and through zarr's integer-array `oindex` baseline.

    python bench/extract.py pipeline --device cpu --encoder resnet50 --image-size 224
    python bench/extract.py storage
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image, ImageDraw
from zarr.codecs import BloscCodec, ZstdCodec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe_machine  # noqa: E402  (bench/machine.py)

from captioner.devices import resolve_device  # noqa: E402
from captioner.encoder import EncoderConfig, FrozenEncoder, build_encoder, image_transform  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402
from captioner.extraction.extract import ExtractConfig, extract_features  # noqa: E402
from captioner.images import load_image  # noqa: E402
from captioner.precision import ENCODER, Precision, resolve_precision  # noqa: E402
from captioner.store import directory_size  # noqa: E402
from captioner.zarr_rows import read_array_rows  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "flickr8k" / "images"


def write_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """Flickr-sized (500x375) JPEGs with smooth gradients and shapes: decode cost like a photo."""
    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = ["image,caption"]
    ramp = np.linspace(0, 1, 500)[None, :, None] * np.linspace(0, 1, 375)[:, None, None]
    for i in range(count):
        base = (ramp * rng.integers(60, 255, size=3) + rng.integers(0, 60, size=3)).astype(np.uint8)
        picture = Image.fromarray(base)
        draw = ImageDraw.Draw(picture)
        for _ in range(6):
            x, y = rng.integers(0, 450), rng.integers(0, 330)
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            draw.ellipse((x, y, x + rng.integers(20, 120), y + rng.integers(20, 120)), fill=colour)
        picture.save(images / f"photo_{i:05d}.jpg", quality=90)
        lines.append(f"photo_{i:05d}.jpg,a photo with shapes")
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")
    return folder


def bench_pipeline(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    config = EncoderConfig(args.encoder, "none", args.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights cost the same as trained ones
        encoder = build_encoder(config)
    settings = encoder_precisions(device)
    chosen = resolve_precision("auto", device, ENCODER)
    print(chosen.describe())
    batches = -(-args.images // args.batch_size)
    ready = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

    def bare_forward(precision: Precision) -> float:
        encoder.to_device(device, precision)

        def one_batch() -> None:
            features = encoder(ready.to(device, non_blocking=True))
            features.to(torch.float16).cpu()  # the pipeline copies its results to the host too

        with torch.inference_mode():
            one_batch()  # warm-up (cuDNN autotune, allocator)
            _sync(device)
            start = time.perf_counter()
            for _ in range(batches):
                one_batch()
            _sync(device)
        return batches * args.batch_size / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        data = write_photos(Path(tmp) / "data", args.images)

        def pipeline(repeat: int) -> float:
            run = ExtractConfig(
                [data / "captions.txt"],
                data / "images",
                Path(tmp) / f"run{repeat}.zarr",
                config,
                device=device.type,
                batch_size=args.batch_size,
                workers=args.workers,
            )  # precision "auto", as the command's default
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                summary = extract_features(run)
            return summary.images_per_second

        decode_ms, write_ms = _side_costs(data, config, encoder)
        bare_runs = {name: [] for name in settings}
        pipeline_runs, occupancy = [], []
        for repeat in range(args.repeats):
            for name, precision in settings.items():
                bare_runs[name].append(bare_forward(precision))
            with _ForwardClock(device) as clock:
                pipeline_runs.append(pipeline(repeat))
            occupancy.append(clock.seconds * pipeline_runs[-1] / args.images)
            rates = ", ".join(f"{name} {runs[-1]:.2f}" for name, runs in bare_runs.items())
            print(
                f"repeat {repeat}: bare {rates}; pipeline {pipeline_runs[-1]:.2f} img/s,"
                f" pipeline loop in forward {occupancy[-1]:.1%}"
            )
    bare = {name: statistics.median(runs) for name, runs in bare_runs.items()}
    piped = statistics.median(pipeline_runs)
    print(
        f"{args.encoder} @ {args.image_size} px on {device}, batch {args.batch_size}, "
        f"{args.images} images, {args.workers} workers, torch threads {torch.get_num_threads()}"
    )
    print(f"bare encoder forward, images/s (median of {args.repeats}), and x float32:")
    for name, rate in bare.items():
        print(f"  {name:28} {rate:8.2f}  {rate / bare['float32']:5.2f}x")
    auto = f"auto ({chosen.dtype})"
    print(f"extraction pipeline:  {piped:.2f} images/s (median of {args.repeats}), {auto}")
    print(f"ratio pipeline / bare at {auto}: {piped / bare[auto]:.3f} (target >= 0.90)")
    print(
        "share of the pipeline's loop spent in the encoder forward:"
        f" {statistics.median(occupancy):.1%}"
    )
    print(
        f"side work per image, one thread: decode+resize {decode_ms:.1f} ms (DataLoader workers),"
        f" compress+write {write_ms:.1f} ms (writer thread); forward {1000 / bare[auto]:.1f} ms"
    )


def encoder_precisions(device: torch.device) -> dict[str, Precision]:
    """The encoder's precisions to compare, by name: float32 without channels-last (the layout
    before precisions were chosen), float32, what auto chooses, and bfloat16 where the device
    computes it (a line says why not, where it does not)."""
    float32 = resolve_precision("float32", device, ENCODER)
    settings = {"float32, not channels-last": replace(float32, channels_last=False)}
    settings["float32"] = float32
    auto = resolve_precision("auto", device, ENCODER)
    settings[f"auto ({auto.dtype})"] = auto
    try:
        settings["bfloat16"] = resolve_precision("bfloat16", device, ENCODER)
    except CaptionerError as refused:
        print(f"bfloat16 not measured: {refused}")
    return settings


class _ForwardClock:
    """Sums the wall time of FrozenEncoder.forward while active (CPU only: on CUDA the forward is
    asynchronous, and timing it would need a synchronization that changes the pipeline)."""

    def __init__(self, device: torch.device):
        self.seconds = float("nan") if device.type == "cuda" else 0.0
        self._active = device.type != "cuda"

    def __enter__(self) -> _ForwardClock:
        if self._active:
            self._forward = FrozenEncoder.forward

            def timed(encoder, images):
                start = time.perf_counter()
                try:
                    return self._forward(encoder, images)
                finally:
                    self.seconds += time.perf_counter() - start

            FrozenEncoder.forward = timed
        return self

    def __exit__(self, *exc) -> None:
        if self._active:
            FrozenEncoder.forward = self._forward


def _side_costs(data: Path, config: EncoderConfig, encoder) -> tuple[float, float]:
    """Milliseconds per image of the work the pipeline hides behind the forward pass."""
    transform = image_transform(config)
    paths = sorted((data / "images").glob("*.jpg"))[:16]
    start = time.perf_counter()
    for path in paths:
        transform(load_image(path))
    decode = (time.perf_counter() - start) / len(paths) * 1000
    regions, channels = encoder.grid[0] * encoder.grid[1], encoder.channels
    maps = np.abs(np.random.default_rng(0).normal(size=(64, regions, channels))).astype(np.float16)
    with tempfile.TemporaryDirectory() as tmp:
        array = zarr.create_array(
            store=tmp,
            shape=maps.shape,
            chunks=(1, regions, channels),
            shards=maps.shape,
            dtype="float16",
            compressors=(ZstdCodec(level=1),),
        )
        start = time.perf_counter()
        array[:] = maps
        write = (time.perf_counter() - start) / len(maps) * 1000
    return decode, write


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def realistic_maps(count: int, seed: int = 0) -> np.ndarray:
    """(count, 196, 2048) float16 maps: ResNet-50 (random weights, 448 px; ImageNet weights cannot
    be downloaded here) over the real Flickr8k fixture photos (or generated photos), multiplied
    into `count` distinct maps by shuffling regions and jittering values (zeros stay zeros), so a
    compressor sees the value distribution of real maps but no repeated bytes."""
    paths = sorted(FIXTURES.glob("*.jpg"))
    if not paths:
        paths = sorted((write_photos(Path(tempfile.mkdtemp()), 10) / "images").glob("*.jpg"))
    config = EncoderConfig("resnet50", "none", 448)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = build_encoder(config)
    transform = image_transform(config)
    with torch.inference_mode():
        base = encoder(torch.stack([transform(load_image(p)) for p in paths])).numpy()
    print(f"base maps {base.shape}, zero fraction {float((base == 0).mean()):.2f}")
    rng = np.random.default_rng(seed)
    maps = np.empty((count, *base.shape[1:]), dtype=np.float16)
    for i in range(count):
        source = base[i % len(base)][rng.permutation(base.shape[1])]
        maps[i] = source * rng.uniform(0.9, 1.1, size=source.shape).astype(np.float32)
    return maps


ZSTD_1, ZSTD_3 = (ZstdCodec(level=1),), (ZstdCodec(level=3),)
LAYOUTS = {
    # name: (images per inner chunk, images per shard or None, compressors)
    "chunk 1, no shard, zstd-1": (1, None, ZSTD_1),
    "chunk 16, no shard, zstd-1": (16, None, ZSTD_1),
    "chunk 1, shard 16, zstd-1": (1, 16, ZSTD_1),
    "chunk 1, shard 64, zstd-1": (1, 64, ZSTD_1),
    "chunk 1, shard 64, zstd-3": (1, 64, ZSTD_3),
    "chunk 1, shard 64, none": (1, 64, ()),
    "chunk 1, shard 64, blosc-lz4": (
        1,
        64,
        (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
    ),
}


def bench_storage(args: argparse.Namespace) -> None:
    maps = realistic_maps(args.images)
    count, regions, channels = maps.shape
    raw_mb = maps.nbytes / count / 1e6
    print(f"{count} maps of {regions}x{channels} float16 = {raw_mb:.2f} MB each uncompressed")
    print("images/s reading 64 images: random rows (ours warm, cold; zarr oindex warm) and")
    print("one aligned run of 64 rows (ours warm, cold); medians over batches")
    print(
        f"{'layout':28} {'MB/img':>7} {'files':>6} {'write':>6} |"
        f" {'random':>6} {'cold':>5} {'oindex':>6} {'ratio':>6} | {'aligned':>7} {'cold':>5}"
    )
    rng = np.random.default_rng(1)
    random_rows = [np.sort(rng.choice(count, 64, replace=False)) for _ in range(args.batches)]
    aligned_rows = [
        np.arange(64) + 64 * int(rng.integers(count // 64)) for _ in range(args.batches)
    ]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for name, (chunk, shard, compressors) in LAYOUTS.items():
            path = Path(tmp) / f"{len(os.listdir(tmp))}.zarr"
            array = zarr.create_array(
                store=str(path),
                shape=maps.shape,
                chunks=(chunk, regions, channels),
                shards=(shard, regions, channels) if shard else None,
                dtype="float16",
                compressors=compressors,
                fill_value=0,
            )
            start = time.perf_counter()
            step = shard or chunk
            for first in range(0, count, step):  # whole shards (or chunks) at a time, as extraction
                array[first : first + step] = maps[first : first + step]
            write = count / (time.perf_counter() - start)
            files = [f for f in path.rglob("*") if f.is_file()]
            for f in files:
                with open(f, "rb+") as handle:
                    os.fsync(handle.fileno())

            def ours(rows, array=array):
                return read_array_rows(array, rows)

            def oindex(rows, array=array):
                return array.oindex[rows]

            random_warm = _median_rate(ours, random_rows, files, drop_cache=False)
            random_cold = _median_rate(ours, random_rows, files, drop_cache=True)
            random_oindex = _median_rate(oindex, random_rows, files, drop_cache=False)
            aligned_warm = _median_rate(ours, aligned_rows, files, drop_cache=False)
            aligned_cold = _median_rate(ours, aligned_rows, files, drop_cache=True)
            size = directory_size(path) / count / 1e6
            print(
                f"{name:28} {size:7.3f} {len(files):6d} {write:6.0f} |"
                f" {random_warm:6.0f} {random_cold:5.0f} {random_oindex:6.0f}"
                f" {random_warm / random_oindex:6.1f} | {aligned_warm:7.0f} {aligned_cold:5.0f}"
            )


def _median_rate(read, batches: list, files: list[Path], drop_cache: bool) -> float:
    """Median images/s of `read(rows)` over the batches; `drop_cache` evicts the store's pages
    from the page cache first (posix_fadvise), so the bytes come from the disk."""
    rates = []
    for rows in batches:
        if drop_cache:
            for f in files:
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        start = time.perf_counter()
        read(rows)
        rates.append(len(rows) / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parts = parser.add_subparsers(dest="part", required=True)
    pipeline = parts.add_parser("pipeline", help="extraction pipeline vs bare encoder forward")
    pipeline.add_argument("--device", default="auto")
    pipeline.add_argument("--encoder", help="default: resnet152 on a GPU, resnet50 on the CPU")
    pipeline.add_argument("--image-size", type=int, help="default: 448 on a GPU, 224 on the CPU")
    pipeline.add_argument("--images", type=int, help="default: 2048 on a GPU, 96 on the CPU")
    pipeline.add_argument("--batch-size", type=int, help="default: 64 on a GPU, 16 on the CPU")
    pipeline.add_argument("--workers", type=int, help="default: 8 on a GPU, 1 on the CPU")
    pipeline.add_argument("--repeats", type=int, default=3)
    storage = parts.add_parser("storage", help="chunking, sharding and compression of `spatial`")
    storage.add_argument("--images", type=int, default=256)
    storage.add_argument("--batches", type=int, default=6, help="batches of 64 to read")
    storage.add_argument("--tmp", default=None, help="folder for the trial stores (a real disk)")
    args = parser.parse_args(argv)
    print(describe_machine())
    if args.part == "storage":
        bench_storage(args)
        return
    # resnet152 at 448 px runs ~1 image/s on a CPU core: the CPU defaults are a smaller encoder.
    gpu = resolve_device(args.device).type == "cuda"
    defaults = {
        "encoder": ("resnet152", "resnet50"),
        "image_size": (448, 224),
        "images": (2048, 96),
        "batch_size": (64, 16),
        "workers": (8, 1),
    }
    for name, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    bench_pipeline(args)


if __name__ == "__main__":
    if len(sys.argv) == 1:  # `make bench`: both parts with their defaults
        main(["pipeline"])
        main(["storage"])
    else:
        main()
