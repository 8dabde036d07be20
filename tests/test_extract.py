"""Phase 1 end to end on generated pictures with the tiny encoder: schema, provenance, failures,
exact resume after SIGKILL, torchrun with two processes, refusals."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import single_thread
from factories import damage, failing_on_call
from PIL import Image

from captioner.cli import main
from captioner.encoder import EncoderConfig, FrozenEncoder, build_encoder, image_transform
from captioner.errors import CaptionerError
from captioner.extraction.extract import ExtractConfig, extract_features
from captioner.extraction.integrity import damaged_shards
from captioner.images import load_image
from captioner.readers import read_corpus
from captioner.store import STATUS_DONE, STATUS_FAILED, FeatureStore, StoreWriter

REPO = Path(__file__).resolve().parents[1]
ENCODER = EncoderConfig("tiny", "none", 64)
ARRAYS = (
    "spatial",
    "pooled",
    "status",
    "failure",
    "image_id",
    "image_path",
    "split",
    "captions/text",
    "captions/tokens",
    "captions/image",
)
BROKEN = {
    "img_002.jpg": "empty file",
    "img_005.jpg": "cannot decode",
    "img_007.jpg": "not an image",
}


def make_dataset(root: Path, images: int, broken: bool = True) -> Path:
    """`images` small pictures (a few of them broken or in odd modes) and a Kaggle captions.txt."""
    folder = root / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["image,caption"]
    for i in range(images):
        name = f"img_{i:03d}.jpg"
        pixels = rng.integers(0, 256, size=(40 + i % 3 * 8, 56, 3), dtype=np.uint8)
        picture = Image.fromarray(pixels)
        if i % 4 == 1:
            picture = picture.convert("CMYK")
        elif i % 4 == 3:
            picture = picture.convert("L")
        picture.save(folder / name, quality=90)
        lines += [f"{name},a picture number {i} with {w} things" for w in ("red", "blue")]
    if broken:
        (folder / "img_002.jpg").write_bytes(b"")
        whole = (folder / "img_005.jpg").read_bytes()
        (folder / "img_005.jpg").write_bytes(whole[: len(whole) // 3])
        (folder / "img_007.jpg").write_text("I am a text file")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


def config_for(root: Path, out: str = "s.zarr", **options) -> ExtractConfig:
    options = {"encoder": ENCODER, "batch_size": 3, "workers": 0, "images_per_shard": 4, **options}
    return ExtractConfig([root / "captions.txt"], root / "images", root / out, **options)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in ARRAYS}


def assert_same_arrays(a: Path, b: Path) -> None:
    first, second = read_arrays(a), read_arrays(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), images=14)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted single-process extraction, with DataLoader worker processes."""
    out = tmp_path_factory.mktemp("reference") / "s.zarr"
    with single_thread():  # as the subprocesses that tests compare with it
        summary = extract_features(config_for(dataset, workers=2, out=str(out)))
    assert summary.processed == 14 and not summary.already_complete
    return out


def test_store_schema_provenance_and_features(dataset, reference):
    store = FeatureStore.open(reference)
    corpus = read_corpus([dataset / "captions.txt"])
    encoder = build_encoder(ENCODER)
    assert (store.num_images, store.grid, store.channels, store.dtype) == (
        14,
        (2, 2),
        encoder.channels,
        "float16",
    )
    assert store.corpus() == corpus
    assert store.image_ids() == [image.id for image in corpus.images]

    attrs = store.attrs
    assert attrs["settings"]["encoder"] == {"name": "tiny", "weights": "none", "image_size": 64}
    assert attrs["settings"]["weights_checksum"] == encoder.weights_checksum
    assert attrs["settings"]["grid"] == [2, 2] and attrs["settings"]["channels"] == encoder.channels
    assert {"torch", "torchvision", "zarr", "numpy", "captioner"} <= attrs["versions"].keys()
    assert attrs["corpus"]["sources"] == [str(dataset / "captions.txt")]
    assert attrs["images_root"] == str((dataset / "images").resolve())

    group = zarr.open_group(str(reference), mode="r")
    channels = encoder.channels
    assert group["spatial"].shape == (14, 4, channels) and group["spatial"].dtype == np.float16
    assert group["spatial"].shards == (4, 4, channels)
    assert group["spatial"].chunks == (1, 4, channels)
    assert group["pooled"].dtype == np.float32

    # failures are data: the three broken files, with reasons; odd modes were converted instead
    status = store.status()
    failed = {store.image_ids()[row] for row in np.flatnonzero(status == STATUS_FAILED)}
    assert failed == set(BROKEN)
    assert (np.delete(status, [2, 5, 7]) == STATUS_DONE).all()
    for image_id, reason in store.failures():
        assert BROKEN[image_id] in reason
    assert np.isnan(store.read_spatial(np.array([2]))).all()

    # the stored numbers are the encoder's, and pooled is the mean of the float32 map
    good = np.flatnonzero(status == STATUS_DONE)
    transform = image_transform(ENCODER)
    good_ids = [image_id for image_id in store.image_ids() if image_id not in BROKEN]
    pictures = torch.stack([transform(load_image(dataset / "images" / i)) for i in good_ids])
    with torch.inference_mode():
        expected = encoder(pictures).numpy()
    # float32 sums over batches of other shapes can round to the neighbouring float16 value
    np.testing.assert_allclose(store.read_spatial(good), expected, rtol=1e-3, atol=1e-3)
    # pooled comes from the float32 map: far closer than float16's 2**-11 (batch shapes aside)
    np.testing.assert_allclose(store.read_pooled(good), expected.mean(1), rtol=1e-4, atol=1e-6)
    spatial = store.read_spatial(good).astype(np.float32)
    # float16 keeps 11 significant bits: each value is within 2**-11 relative of the float32 one
    np.testing.assert_allclose(store.read_pooled(good), spatial.mean(1), rtol=2**-10, atol=1e-4)


def test_features_info_lists_counts_and_failures(reference):
    result = CliRunner().invoke(main, ["features", "info", str(reference)])
    assert result.exit_code == 0, result.output
    assert "(14, 4, 128) float16" in result.output
    assert "done 11, failed 3" in result.output
    assert "img_002.jpg: empty file (0 bytes)" in result.output


def test_rerun_of_a_finished_store_does_nothing_and_says_so(dataset, reference, tmp_path):
    copy = tmp_path / "s.zarr"
    shutil.copytree(reference, copy)
    shards = sorted((copy / "spatial" / "c").rglob("*"))
    before = {path: path.stat().st_mtime_ns for path in shards}
    summary = extract_features(config_for(dataset, out=str(copy)))
    assert summary.already_complete and summary.processed == 0
    assert summary.describe().startswith(f"nothing to do: {copy} is already complete")
    assert {path: path.stat().st_mtime_ns for path in shards} == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"encoder": EncoderConfig("tiny", "none", 96)}, "encoder.image_size 64 in the store, 96"),
        ({"dtype": "float32"}, "dtype float16 in the store, float32 now"),
        ({"limit": 5}, "the images or captions differ"),
    ],
)
def test_other_settings_are_refused_unless_overwrite(dataset, reference, tmp_path, change, message):
    copy = tmp_path / "s.zarr"
    shutil.copytree(reference, copy)
    with pytest.raises(CaptionerError, match="was extracted with other settings") as refused:
        extract_features(config_for(dataset, out=str(copy), **change))
    assert message in str(refused.value)
    assert_same_arrays(copy, reference)  # nothing was touched


def test_overwrite_replaces_the_store(dataset, reference, tmp_path):
    copy = tmp_path / "s.zarr"
    shutil.copytree(reference, copy)
    config = config_for(dataset, out=str(copy), dtype="float32", limit=6, overwrite=True)
    summary = extract_features(config)
    store = FeatureStore.open(copy)
    assert (summary.processed, store.num_images, store.dtype) == (6, 6, "float32")
    good = np.flatnonzero(store.status() == STATUS_DONE)
    # The same features, up to the float16 rounding of the reference (float32 sums in batches
    # of other shapes may round to the neighbouring half-precision value).
    np.testing.assert_allclose(
        store.read_spatial(good), read_arrays(reference)["spatial"][good], rtol=1e-3, atol=1e-3
    )
    np.testing.assert_allclose(store.read_pooled(good), store.read_spatial(good).mean(1), rtol=1e-6)


# Runs the real command with a slowed-down encoder, so the test can kill it between shards.
SLOW_EXTRACT = """
import sys, time
import captioner.encoder as encoder
forward = encoder.FrozenEncoder.forward
def slow_forward(self, images):
    time.sleep(0.25)
    return forward(self, images)
encoder.FrozenEncoder.forward = slow_forward
from captioner.cli import main
main(["extract", *sys.argv[1:]])
"""


def cli_options(config: ExtractConfig) -> list[str]:
    return [
        "--captions",
        str(config.captions[0]),
        "--images",
        str(config.images),
        "--out",
        str(config.out),
        "--encoder",
        "tiny",
        "--weights",
        "none",
        "--image-size",
        "64",
        "--batch-size",
        str(config.batch_size),
        "--images-per-shard",
        str(config.images_per_shard),
        "--workers",
        "0",
    ]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def extract_with_two_ranks(config: ExtractConfig) -> subprocess.CompletedProcess:
    """extract_features.py run by torchrun with two processes."""
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "extract_features.py"),
            *cli_options(config),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_resume_after_sigkill_equals_an_uninterrupted_run(dataset, reference, tmp_path, one_thread):
    config = config_for(dataset, out=str(tmp_path / "s.zarr"))
    run = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXTRACT, *cli_options(config)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    done_rows = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        if (config.out / "zarr.json").exists():
            done_rows = int((FeatureStore.open(config.out).status() != 0).sum())
            if done_rows >= 8:  # two of four shards are durable: kill it mid-way
                break
        time.sleep(0.02)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, run.stderr.read().decode()
    done_rows = int((FeatureStore.open(config.out).status() != 0).sum())
    assert 8 <= done_rows < 14, "the run was not killed mid-way"

    summary = extract_features(config)
    assert summary.processed == 14 - done_rows  # nothing durable was recomputed
    assert (summary.done, summary.failed, summary.pending) == (11, 3, 0)
    assert_same_arrays(config.out, reference)
    assert not list(config.out.rglob("*.partial"))


def test_sigterm_ends_extraction_after_the_shard_in_hand_and_the_rerun_finishes(
    dataset, reference, tmp_path, one_thread, monkeypatch
):
    forward, calls = FrozenEncoder.forward, []

    def signalled_on_the_third_batch(self, images):
        calls.append(len(images))
        if len(calls) == 3:  # the first batch of shard 1 (shard 0: rows 0-2 and 3)
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, images)

    monkeypatch.setattr(FrozenEncoder, "forward", signalled_on_the_third_batch)
    config = config_for(dataset, out=str(tmp_path / "s.zarr"))
    summary = extract_features(config)
    assert summary.stopped == "SIGTERM" and summary.processed == 8  # shards 0 and 1, whole
    assert summary.pending == 6 and "run the same command again" in summary.describe()
    assert (FeatureStore.open(config.out).status()[:8] != 0).all()
    monkeypatch.setattr(FrozenEncoder, "forward", forward)
    again = extract_features(config)
    assert again.processed == 6 and not again.stopped
    assert_same_arrays(config.out, reference)


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EACCES])
def test_a_full_disk_or_a_denied_write_is_one_line_and_the_rerun_finishes(
    dataset, reference, tmp_path, one_thread, monkeypatch, fault
):
    write_shard = StoreWriter.write_shard
    monkeypatch.setattr(StoreWriter, "write_shard", failing_on_call(2, fault, write_shard))
    config = config_for(dataset, out=str(tmp_path / "s.zarr"))
    result = CliRunner().invoke(main, ["extract", *cli_options(config)])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith("Error: "), result.output
    assert os.strerror(fault) in last and "run the same command again" in last
    assert "Traceback" not in result.output
    monkeypatch.setattr(StoreWriter, "write_shard", write_shard)
    rerun = CliRunner().invoke(main, ["extract", *cli_options(config)])
    assert rerun.exit_code == 0, rerun.output
    assert_same_arrays(config.out, reference)  # nothing lost, nothing different


def test_repair_re_extracts_only_the_damaged_shards(dataset, reference, tmp_path, one_thread):
    copy = tmp_path / "s.zarr"
    shutil.copytree(reference, copy)
    damage(copy, "spatial", 1)
    damage(copy, "pooled", 2)
    assert [(d.array, d.shard) for d in damaged_shards(FeatureStore.open(copy))] == [
        ("spatial", 1),
        ("pooled", 2),
    ]
    config = config_for(dataset, out=str(copy))
    assert extract_features(config).processed == 0  # without --repair: nothing looks pending
    summary = extract_features(dataclasses.replace(config, repair=True))
    assert summary.processed == 8  # shards 1 and 2, four images each
    assert list(damaged_shards(FeatureStore.open(copy))) == []
    assert_same_arrays(copy, reference)


@pytest.mark.skipif(
    shutil.which("torchrun", path=Path(sys.executable).parent) is None,
    reason="torchrun is not installed next to this Python",
)
def test_torchrun_with_two_processes_equals_one(dataset, reference, tmp_path):
    config = config_for(dataset, out=str(tmp_path / "s.zarr"))
    result = extract_with_two_ranks(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("14 images (11 done, 3 failed)") == 1  # rank 0 reports, once
    assert_same_arrays(config.out, reference)


def test_bad_requests_are_one_line_errors(dataset, tmp_path):
    runner = CliRunner()
    options = ["extract", "--captions", str(dataset / "captions.txt"), "--out", str(tmp_path / "x")]
    if not torch.cuda.is_available():
        result = runner.invoke(main, [*options, "--images", str(dataset / "images"), "--gpu"])
        assert result.exit_code == 1 and "CUDA is not available" in result.output
    result = runner.invoke(main, [*options, "--images", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "image folder not found" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(main, [*options, "--images", str(empty), "--encoder", "tiny"])
    assert result.exit_code == 1 and "none of the first 14 images" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        (1e6, "the features of 2 images overflow float16"),
        (float("nan"), "encoder tiny with weights random-seed-0 gave NaN or inf"),
    ],
    ids=["overflow", "nan"],
)
def test_features_that_are_not_finite_stop_extraction_and_the_finished_shards_stay(
    dataset, reference, tmp_path, one_thread, monkeypatch, fault, said
):
    forward, calls = FrozenEncoder.forward, []

    def faulty_from_the_third_batch(self, images):  # the first batch of shard 1
        calls.append(1)
        return forward(self, images) * (fault if len(calls) >= 3 else 1.0)

    monkeypatch.setattr(FrozenEncoder, "forward", faulty_from_the_third_batch)
    config = config_for(dataset, out=str(tmp_path / "s.zarr"))
    result = CliRunner().invoke(main, ["extract", *cli_options(config)])
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output
    (error,) = errors
    assert said in error and "img_004.jpg, img_006.jpg" in error  # (img_005.jpg is broken)
    assert f"{config.out} keeps the shards finished so far (1 of 4)" in error
    cure = "--dtype float32 --overwrite" if fault == 1e6 else "other --weights"
    assert f"run the same command with {cure}" in error
    store = FeatureStore.open(config.out)
    assert (store.status()[:4] != 0).all() and (store.status()[4:] == 0).all()  # 0: pending
    assert CliRunner().invoke(main, ["features", "verify", str(config.out)]).exit_code == 0
    kept, whole = read_arrays(config.out), read_arrays(reference)
    for name in ("spatial", "pooled", "status"):
        np.testing.assert_array_equal(kept[name][:4], whole[name][:4])
    if fault == 1e6:  # the cure the message names
        cured = CliRunner().invoke(
            main, ["extract", *cli_options(config), "--dtype", "float32", "--overwrite"]
        )
        assert cured.exit_code == 0, cured.output
        store = FeatureStore.open(config.out)
        assert store.dtype == "float32" and (store.status() != 0).all()
        assert np.isfinite(store.read("spatial", store.split_indices("train"))).all()
