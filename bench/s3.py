"""Stores in object storage, against the same store on the local disk, in one run.

(a) read throughput: spatial maps per second read shard by shard through FeatureStore.read from a
    local S3 server (moto's, in a process of its own on 127.0.0.1), with and without a warm
    --cache folder, against the same store on the local disk; and both without the shard
    decoder, zarr decoding each shard chunk by chunk (the baseline);
(b) data wait: the share of a CPU training epoch's time spent waiting for the next batch
    (metrics.jsonl's data_wait), training Show-Attend-and-Tell with train_decoder.py from the
    local store, from S3, and from S3 with --cache (its first epoch fills the cache, the second
    reads it), each with 2 feature-reading threads (--workers 2).

The store holds random float16 maps (7x7x512, 64 images a shard, zstd) for a generated corpus;
the decoder has train_decoder.py's default sizes. moto keeps objects in its process's memory, so
S3 here costs what the protocol and the client cost (requests, checksums, copies), not a
network's bandwidth: a remote bucket adds its latency and bandwidth on top.

    python bench/s3.py [--images 512] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from factories import make_store  # noqa: E402
from machine import describe_machine  # noqa: E402  (bench/machine.py)
from reader import zarr_decoding  # noqa: E402  (bench/reader.py)

from captioner.object_store import RemoteStore  # noqa: E402
from captioner.store import FeatureStore  # noqa: E402

BUCKET = "bench"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_s3_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a process of its own, and its URL once it answers."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    server.kill()
    raise SystemExit("moto_server did not start (pip install 'moto[server]')")


def maps_per_second(location, repeats: int = 3, baseline: bool = False) -> float:
    """Spatial maps read per second, whole shards at a time, best of `repeats`; zarr decoding
    the chunks (`baseline`) or the shard decoder."""
    store = FeatureStore.open(location)
    store = zarr_decoding(store) if baseline else store
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for first in range(0, store.num_images, store.images_per_shard):
            rows = np.arange(first, min(first + store.images_per_shard, store.num_images))
            store.read("spatial", rows)
        best = max(best, store.num_images / (time.perf_counter() - started))
    return best


def data_wait(features: str, run: Path, epochs: int, *more: str) -> list[float]:
    """Each epoch's data-wait share of train_decoder.py from `features`."""
    command = [
        sys.executable,
        str(REPO / "train_decoder.py"),
        "--features",
        features,
        "--out",
        str(run),
        "--model",
        "show-attend-tell",
        "--epochs",
        str(epochs),
        "--workers",
        "2",
        "--device",
        "cpu",
        "--min-count",
        "1",
        *more,
    ]
    subprocess.run(
        command, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["data_wait"] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    print(describe_machine())
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    server, endpoint = start_s3_server()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        import s3fs

        s3fs.S3FileSystem().mkdir(BUCKET)
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            local = make_store(
                folder / "store.zarr",
                images=args.images,
                grid=(7, 7),
                channels=512,
                images_per_shard=64,
                split_fractions=(0.8, 0.1, 0.1),
            )
            url = f"s3://{BUCKET}/store.zarr"
            s3fs.S3FileSystem().put(str(local), url.removeprefix("s3://"), recursive=True)
            cache = folder / "cache"
            megabytes = FeatureStore.open(local).size_on_disk() / 1e6
            print(
                f"store: {args.images} maps of 7x7x512 float16 in shards of 64, {megabytes:.0f} MB"
            )

            print("(a) spatial maps read per second, whole shards (best of 3)")
            on_disk = maps_per_second(local)
            from_s3 = maps_per_second(RemoteStore(url))
            maps_per_second(RemoteStore(url, cache=cache), repeats=1)  # fills the cache
            cached = maps_per_second(RemoteStore(url, cache=cache))
            print(f"  local disk          {on_disk:8.0f} maps/s")
            print(f"  S3                  {from_s3:8.0f} maps/s  ({from_s3 / on_disk:.2f}x)")
            print(f"  S3, warm --cache    {cached:8.0f} maps/s  ({cached / on_disk:.2f}x)")
            for name, location in {"local disk": local, "S3": RemoteStore(url)}.items():
                rate = maps_per_second(location, baseline=True)
                ours = on_disk if name == "local disk" else from_s3
                print(
                    f"  {name}, zarr decoding (baseline) {rate:8.0f} maps/s;"
                    f" the shard decoder is {ours / rate:.2f}x it"
                )

            print(f"(b) data wait of a CPU training epoch ({args.epochs} epochs, --workers 2)")
            runs = {
                "local disk": (str(local), ()),
                "S3": (url, ()),
                "S3 with --cache": (url, ("--cache", str(folder / "train-cache"))),
            }
            for name, (features, more) in runs.items():
                shares = data_wait(features, folder / name.replace(" ", "_"), args.epochs, *more)
                epochs = ", ".join(f"epoch {i + 1} {100 * s:.1f}%" for i, s in enumerate(shares))
                print(f"  {name:18s}  {epochs}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
