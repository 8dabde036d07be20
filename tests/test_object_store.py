"""Stores in object storage, against a real S3 API server (moto's) on 127.0.0.1: extraction
killed and resumed, two torchrun ranks, verify and repair, training and evaluation from S3 with
and without a cache, and the failures said in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
from click.testing import CliRunner
from conftest import single_thread
from factories import make_store
from test_extract import (
    ARRAYS,
    ENCODER,
    REPO,
    SLOW_EXTRACT,
    cli_options,
    extract_with_two_ranks,
    make_dataset,
    read_arrays,
    subprocess_env,
)

from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.extraction.extract import ExtractConfig, extract_features
from captioner.object_store import RemoteStore, store_location
from captioner.store import FeatureStore, open_group
from captioner.text import Vocabulary
from captioner.training.batches import FeatureStream, StreamConfig, encode_captions

pytestmark = pytest.mark.usefixtures("s3_bucket")
CLI_TRAIN = [
    "--model", "show-attend-tell", "--epochs", "2", "--seed", "5", "--embed-size", "8",
    "--hidden-size", "8", "--attention-size", "4", "--min-count", "1", "--batch-size", "6",
    "--lr", "0.01",
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), images=14)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """The same extraction, uninterrupted, into a local folder."""
    out = tmp_path_factory.mktemp("reference") / "s.zarr"
    with single_thread():  # as the subprocesses compared with it compute
        extract_features(config_for(dataset, out))
    return out


def config_for(dataset: Path, out: Path | RemoteStore, **options) -> ExtractConfig:
    options = {"encoder": ENCODER, "batch_size": 3, "workers": 0, "images_per_shard": 4, **options}
    return ExtractConfig([dataset / "captions.txt"], dataset / "images", out, **options)


def assert_same_as(location: RemoteStore, reference: Path) -> None:
    group, local = open_group(location, "r"), read_arrays(reference)
    for name in ARRAYS:
        np.testing.assert_array_equal(group[name][:], local[name], err_msg=name)


def upload(local: Path, url: str) -> RemoteStore:
    s3fs.S3FileSystem().put(str(local), url.removeprefix("s3://"), recursive=True)
    return RemoteStore(url)


def test_extraction_killed_by_sigkill_resumes_to_equal_a_local_run(
    dataset, reference, s3_bucket, one_thread
):
    location = RemoteStore(f"{s3_bucket}/s.zarr")
    config = config_for(dataset, location)
    run = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXTRACT, *cli_options(config)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        if location.exists() and (FeatureStore.open(location).status() != 0).sum() >= 8:
            break  # two of four shards are done: kill it mid-way
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, run.stderr.read().decode()
    done_rows = int((FeatureStore.open(location).status() != 0).sum())
    assert 8 <= done_rows < 14, "the run was not killed mid-way"

    summary = extract_features(config)
    assert summary.processed == 14 - done_rows  # no finished shard was computed again
    assert (summary.done, summary.failed, summary.pending) == (11, 3, 0)
    assert_same_as(location, reference)


@pytest.mark.skipif(
    shutil.which("torchrun", path=Path(sys.executable).parent) is None,
    reason="torchrun is not installed next to this Python",
)
def test_two_torchrun_ranks_write_one_s3_store(dataset, reference, s3_bucket):
    location = RemoteStore(f"{s3_bucket}/s.zarr")
    result = extract_with_two_ranks(config_for(dataset, location))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("14 images (11 done, 3 failed)") == 1
    assert_same_as(location, reference)


def test_verify_names_a_deleted_and_a_corrupted_object_and_repair_mends_them(
    dataset, reference, s3_bucket, one_thread
):
    location = upload(reference, f"{s3_bucket}/s.zarr")
    fs = s3fs.S3FileSystem()
    fs.rm_file(f"{location.root}/spatial/c/1/0/0")  # rows 4-7
    corrupted = bytearray(fs.cat_file(f"{location.root}/pooled/c/2/0"))  # rows 8-11
    corrupted[len(corrupted) // 2] ^= 0x5A
    fs.pipe_file(f"{location.root}/pooled/c/2/0", bytes(corrupted))

    verified = CliRunner().invoke(main, ["features", "verify", location.url])
    assert verified.exit_code == 1
    lines = verified.output.splitlines()
    for named, image in [
        ("spatial shard 1, rows 4-7", "img_004"),
        ("pooled shard 2, rows 8-11", "img_008"),
    ]:
        assert any(f"{named}, is damaged" in line and image in line for line in lines)
    assert "Error: " in verified.output and "2 shards are damaged" in verified.output

    repaired = extract_features(dataclasses.replace(config_for(dataset, location), repair=True))
    assert repaired.processed == 8  # shards 1 and 2, and nothing else
    assert CliRunner().invoke(main, ["features", "verify", location.url]).exit_code == 0
    assert_same_as(location, reference)


def test_training_from_s3_equals_training_from_the_local_copy_and_resumes(s3_bucket, tmp_path):
    local = make_store(tmp_path / "store.zarr", images=16, seed=2)
    location = upload(local, f"{s3_bucket}/store.zarr")

    def train(features: str, run: Path, *more: str) -> list[dict]:
        result = CliRunner().invoke(
            main, ["train", "--features", features, "--out", str(run), *CLI_TRAIN, *more]
        )
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def scores(rows: list[dict]) -> list[tuple]:
        return [(r["epoch"], r["train_loss"], r["val_loss"], r["val_bleu4"]) for r in rows]

    expected = scores(train(str(local), tmp_path / "local"))
    cache, run = tmp_path / "cache", tmp_path / "s3"
    first = train(location.url, run, "--cache", str(cache), "--workers", "2", "--epochs", "1")
    assert scores(first) == expected[:1]
    # Training and validation read shards 0-2 (rows 0-11); the test split's shard 3 waits.
    assert len(list(cache.rglob("spatial/c/*/0/0.*"))) == 3
    resumed = train(location.url, run, "--resume")
    assert scores(resumed) == expected
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["training"]["options"]["features"] == location.url

    evaluated = CliRunner().invoke(
        main,
        ["evaluate", "--checkpoint", str(run / "best.pt"), "--features",
         location.url, "--cache", str(cache), "--out", str(tmp_path / "eval"),
         "--metrics", "nltk-fallback"],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["features"] == location.url


def test_two_torchrun_ranks_train_from_an_s3_store_through_one_cache(s3_bucket, tmp_path):
    """Both ranks read the store from object storage and share one cache folder, whose copies
    each rank writes whole or not at all."""
    location = upload(make_store(tmp_path / "store.zarr", images=16, seed=2), f"{s3_bucket}/s.zarr")
    cache, run = tmp_path / "cache", tmp_path / "ddp"
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
    command += [str(REPO / "train_decoder.py"), "--features", location.url, "--cache", str(cache)]
    command += ["--out", str(run), "--device", "cpu", *CLI_TRAIN, "--epochs", "1"]
    result = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["ranks"] == 2 and np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["training"]["options"]["features"] == location.url
    # The train and validation rows lie in shards 0-2; the test split's shard 3 was not read.
    assert len(list(cache.rglob("spatial/c/*/0/0.*"))) == 3
    assert not list(cache.rglob(".*"))  # no partial copy left behind


def test_preload_reads_the_same_maps_from_s3_as_from_a_disk(s3_bucket, tmp_path):
    local = make_store(tmp_path / "store.zarr", images=16, seed=2)
    location = upload(local, f"{s3_bucket}/store.zarr")
    streams = []
    for store in (FeatureStore.open(local), FeatureStore.open(location)):
        corpus = store.corpus()
        rows = store.split_indices("train")
        vocabulary = Vocabulary.build([c.tokens for c in corpus.captions], min_count=1)
        captions = encode_captions(corpus, vocabulary, rows.tolist(), 20)
        config = StreamConfig(kind="spatial", preload=True, workers=0)
        streams.append(next(FeatureStream(store, rows, captions, config).epoch(0)))
    from_disk, from_s3 = streams
    assert np.array_equal(from_disk.rows, from_s3.rows)
    assert torch.equal(from_disk.features, from_s3.features)


def test_reads_retry_a_lost_connection_and_then_stop_in_one_line(s3_bucket, tmp_path, monkeypatch):
    """Through a second server on the same (in-process) buckets, which the test stops: a read
    that meets the outage retries until the server is back, and one that outlasts every try
    ends in one line naming the URL."""
    from moto.server import ThreadedMotoServer

    import captioner.object_store

    local = make_store(tmp_path / "store.zarr", images=8, seed=3)
    url = upload(local, f"{s3_bucket}/store.zarr").url
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    # (botocore's own retries off, so that the tries counted are these)
    endpoint = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    store = FeatureStore.open(RemoteStore(url, endpoint))
    rows = np.arange(8)
    expected = FeatureStore.open(local).read("spatial", rows)
    monkeypatch.setattr(captioner.object_store, "_FIRST_PAUSE", 0.2)  # tries 0.2, 0.4, 0.8 s apart
    server.stop()
    back = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    restart = threading.Timer(0.3, back.start)
    restart.start()
    started = time.monotonic()
    try:
        np.testing.assert_array_equal(store.read("spatial", rows), expected)
        assert time.monotonic() - started >= 0.2  # a pause at least: the first try met the outage
    finally:
        restart.join()
        back.stop()
    with pytest.raises(CaptionerError) as stopped:
        store.read("spatial", rows)
    assert str(stopped.value).startswith(f"{url}: cannot reach http://127.0.0.1:{port}")
    assert "after 4 tries" in str(stopped.value)


def one_line_error(*arguments: str) -> str:
    result = CliRunner().invoke(main, list(arguments))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_a_missing_bucket_a_closed_port_and_denied_access_are_one_line_each(
    s3_bucket, reference, monkeypatch
):
    missing = one_line_error("features", "info", "s3://no-such-bucket/s.zarr")
    assert "s3://no-such-bucket/s.zarr: no such bucket 'no-such-bucket'" in missing

    unreachable = json.dumps(
        {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
    )
    closed = one_line_error(
        "features", "info", f"{s3_bucket}/s.zarr", "--storage-options", unreachable
    )
    assert f"{s3_bucket}/s.zarr: cannot reach http://127.0.0.1:9" in closed

    location = upload(reference, f"{s3_bucket}/s.zarr")
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # check credentials
    strangers = json.dumps({"key": "stranger", "secret": "stranger"})
    denied = one_line_error("features", "info", location.url, "--storage-options", strangers)
    assert f"{location.url}: access denied" in denied and "credentials" in denied


def test_store_locations_and_a_missing_filesystem_package(tmp_path):
    assert store_location(str(tmp_path / "s.zarr")) == tmp_path / "s.zarr"
    remote = store_location("s3://bucket/s.zarr/", '{"anon": true}', tmp_path)
    assert (remote.url, remote.storage_options, remote.cache) == (
        "s3://bucket/s.zarr",
        {"anon": True},
        tmp_path,
    )
    assert str(remote) == "s3://bucket/s.zarr" and "anon" not in repr(remote)
    line = one_line_error("features", "info", str(tmp_path), "--storage-options", "{}")
    assert "--storage-options applies to stores in object storage only" in line
    assert "not JSON" in one_line_error("features", "info", "s3://b/s", "--storage-options", "{")
    if shutil.which("gcsfs") is None:
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            line = one_line_error("features", "info", "gs://bucket/s.zarr")
            assert "gs://bucket/s.zarr: stores on gs:// need the gcsfs package" in line
