"""--precision: what auto picks on each kind of CPU, bfloat16 refused where there is no bf16, how
far bf16 features are from float32 ones, a store that records its precision and is finished in
it, and the option reaching every command's config.

This machine's CPU may lack bf16 altogether: the tests that compute in bf16 give the CPU the
flags of one with AMX (PyTorch computes bf16 on any CPU, slowly where it emulates it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from factories import make_store
from test_extract import ENCODER, assert_same_arrays, make_dataset, read_arrays

from captioner import precision
from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.precision import ENCODER as ENCODER_WORK
from captioner.precision import resolve_precision
from captioner.store import FeatureStore, StoreWriter

CPU = torch.device("cpu")
AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
NO_BF16 = frozenset({"avx2", "fma"})


def given_flags(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str] | None) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (
        result.output
    )
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "expected", "why"),
    [
        (
            AMX,
            {"encoder": "bfloat16", "show-tell": "float32", "show-attend-tell": "float32"}
            | {"transformer": "bfloat16"},
            "AMX",
        ),
        (AVX512_BF16, dict.fromkeys(["encoder", "transformer"], "float32"), "avx512_bf16"),
        (NO_BF16, dict.fromkeys(["encoder", "transformer"], "float32"), "no bf16 matrix units"),
        (None, dict.fromkeys(["encoder", "transformer"], "float32"), "features are unknown"),
    ],
)
def test_auto_follows_the_cpu_flags_and_the_work(monkeypatch, flags, expected, why):
    given_flags(monkeypatch, flags)
    for work, dtype in expected.items():
        chosen = resolve_precision("auto", CPU, work)
        assert chosen.dtype == dtype, work
        assert chosen.channels_last == (work == ENCODER_WORK)
    assert why in resolve_precision("auto", CPU, ENCODER_WORK).reason


def test_the_first_line_says_the_choice_and_why(monkeypatch):
    given_flags(monkeypatch, NO_BF16)
    assert resolve_precision("auto", CPU, ENCODER_WORK).describe() == (
        "precision: float32, channels-last (this CPU has no bf16 matrix units)"
    )
    given_flags(monkeypatch, AMX)
    assert resolve_precision("auto", CPU, ENCODER_WORK).describe() == (
        "precision: bfloat16 autocast, channels-last (this CPU's AMX units run bf16 products"
        " faster than float32)"
    )


def test_cpu_flags_come_from_proc_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: A CPU\nflags\t\t: fpu avx2 amx_bf16\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert precision.cpu_flags() == {"fpu", "avx2", "amx_bf16"}
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # an Arm CPU
    assert precision.cpu_flags() == {"fp", "asimd", "bf16"}
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "absent")
    assert precision.cpu_flags() is None


def test_bfloat16_is_refused_in_one_line_where_the_cpu_has_none(monkeypatch, tmp_path):
    given_flags(monkeypatch, NO_BF16)
    with pytest.raises(CaptionerError, match="--precision bfloat16: this CPU has no bf16"):
        resolve_precision("bfloat16", CPU, ENCODER_WORK)
    data = make_dataset(tmp_path / "data", images=4, broken=False)
    result = invoke(
        "extract", "--captions", data / "captions.txt", "--images", data / "images",
        "--out", tmp_path / "s.zarr", "--encoder", "tiny", "--weights", "none",
        "--image-size", 64, "--workers", 0, "--precision", "bfloat16",
    )  # fmt: skip
    line = one_error_line(result)
    assert "this CPU has no bf16 instructions" in line and "--precision auto or float32" in line
    assert not (tmp_path / "s.zarr").exists()
    given_flags(monkeypatch, AVX512_BF16)  # slower than float32 there, but it computes bf16
    assert resolve_precision("bfloat16", CPU, "show-tell").dtype == "bfloat16"


def extract(data: Path, out: Path, *options: object):
    return invoke(
        "extract", "--captions", data / "captions.txt", "--images", data / "images",
        "--out", out, "--encoder", ENCODER.name, "--weights", ENCODER.weights,
        "--image-size", ENCODER.image_size, "--batch-size", 3, "--workers", 0,
        "--images-per-shard", 4, "--dtype", "float32", *options,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """The same pictures extracted in float32 and in bfloat16 (on a CPU given AMX's flags)."""
    root = tmp_path_factory.mktemp("precision")
    data = make_dataset(root / "data", images=10, broken=False)
    made = {"data": data}
    with pytest.MonkeyPatch.context() as monkeypatch:
        given_flags(monkeypatch, AMX)
        for name in ("float32", "bfloat16"):
            result = extract(data, root / f"{name}.zarr", "--precision", name)
            assert result.exit_code == 0, result.output
            assert f"precision: {name}" in result.output.splitlines()[0]
            made[name] = root / f"{name}.zarr"
    return made


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_bf16_features_are_close_to_float32_ones(stores):
    exact, rounded = (FeatureStore.open(stores[name]) for name in ("float32", "bfloat16"))
    rows = np.arange(exact.num_images)
    # Measured on the tiny encoder: every cosine similarity above 0.99998.
    assert cosines(exact.read_pooled(rows), rounded.read_pooled(rows)).min() > 0.999
    assert cosines(exact.read_spatial(rows), rounded.read_spatial(rows)).min() > 0.999
    regions = exact.read_spatial(rows).reshape(-1, exact.channels)
    assert cosines(regions, rounded.read_spatial(rows).reshape(-1, exact.channels)).min() > 0.999
    assert not np.array_equal(exact.read_pooled(rows), rounded.read_pooled(rows))


def test_the_store_records_its_precision_and_features_info_shows_it(stores, tmp_path):
    assert FeatureStore.open(stores["bfloat16"]).settings.precision == "bfloat16"
    result = invoke("features", "info", stores["bfloat16"])
    assert "precision    bfloat16 autocast: the encoder computed these features in it" in (
        result.output
    )
    assert "precision    float32:" in invoke("features", "info", stores["float32"]).output
    # A store made before stores recorded their precision still opens, and says so.
    old = tmp_path / "old.zarr"
    shutil.copytree(stores["float32"], old)
    group = zarr.open_group(str(old), mode="r+")
    settings = dict(group.attrs["settings"])
    del settings["precision"]
    group.attrs["settings"] = settings
    assert FeatureStore.open(old).settings.precision is None
    assert "precision    not recorded" in invoke("features", "info", old).output


def test_a_resumed_extraction_keeps_the_store_precision_and_equals_an_uninterrupted_run(
    stores, tmp_path, monkeypatch
):
    given_flags(monkeypatch, AMX)
    resumed = tmp_path / "resumed.zarr"
    shutil.copytree(stores["bfloat16"], resumed)
    writer = StoreWriter(resumed)
    for shard in (1, 2):  # as a run killed before these shards were written leaves them
        writer.write_shard(shard, *blank_shard(writer, shard), {})
        writer.mark_pending(shard)
    result = extract(stores["data"], resumed, "--precision", "float32")
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith(f"precision: bfloat16 autocast, channels-last (the precision {resumed}")
    assert "--precision float32 gives float32 here" in first
    assert_same_arrays(resumed, stores["bfloat16"])
    assert read_arrays(resumed)["status"].min() > 0


def blank_shard(writer: StoreWriter, shard: int) -> tuple[np.ndarray, np.ndarray]:
    rows = len(writer.shard_rows(shard))
    regions = writer.settings.grid[0] * writer.settings.grid[1]
    channels = writer.settings.channels
    return np.zeros((rows, regions, channels)), np.zeros((rows, channels))


def test_a_store_started_in_bf16_is_not_finished_without_bf16(stores, tmp_path, monkeypatch):
    given_flags(monkeypatch, NO_BF16)
    resumed = tmp_path / "resumed.zarr"
    shutil.copytree(stores["bfloat16"], resumed)
    StoreWriter(resumed).mark_pending(0)
    line = one_error_line(extract(stores["data"], resumed))
    assert "its features were started in bfloat16, but this CPU has no bf16" in line
    assert "--overwrite" in line


def capture(monkeypatch, module: str, function: str) -> list:
    """The configs a command hands its library call, which is replaced by one that refuses."""
    seen = []

    def stand_in(config, *args, **kwargs):
        seen.append(config)
        raise CaptionerError("captured")

    monkeypatch.setattr(f"{module}.{function}", stand_in)
    return seen


@pytest.mark.parametrize(
    ("command", "module", "function"),
    [
        (
            ["extract", "--captions", "c.txt", "--images", ".", "--out", "s.zarr"],
            "captioner.cli.extract_commands",
            "extract_features",
        ),
        (
            ["train", "--features", "s.zarr", "--out", "runs/x"],
            "captioner.cli.train_commands",
            "train",
        ),
        (
            ["evaluate", "--checkpoint", "b.pt", "--features", "s.zarr", "--out", "r"],
            "captioner.cli.inference_commands",
            "evaluate",
        ),
        (
            ["caption", "pictures", "--checkpoint", "b.pt", "--out", "c.csv"],
            "captioner.cli.inference_commands",
            "caption_images",
        ),
    ],
)
def test_the_option_reaches_the_config(monkeypatch, command, module, function):
    seen = capture(monkeypatch, module, function)
    assert invoke(*command).exit_code == 1 and seen[-1].precision == "auto"
    assert invoke(*command, "--precision", "float32").exit_code == 1
    assert seen[-1].precision == "float32"
    result = invoke(*command, "--precision", "float64")
    assert result.exit_code == 2 and "'float64' is not one of" in result.output


def test_training_in_bf16_runs_and_records_it(monkeypatch, tmp_path):
    given_flags(monkeypatch, AMX)
    store = make_store(tmp_path / "s.zarr", images=12)
    sizes = ["--d-model", 16, "--layers", 1, "--heads", 2, "--ff-size", 32, "--encoder-layers", 0]
    result = invoke(
        "train", "--features", store, "--out", tmp_path / "run", "--model", "transformer",
        "--epochs", 1, "--min-count", 1, "--batch-size", 12, "--workers", 0, *sizes,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "precision: bfloat16 autocast (this CPU's AMX units" in result.output
    best, _ = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best.training["precision"] == "bfloat16"
