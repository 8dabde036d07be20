"""Never silently wrong: NaN or inf in a store's features stops the command in one line, keeping
what was already written. (Extraction's own check is in test_extract.py.)"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from factories import make_store
from inference_factories import make_checkpoint

from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.store import FeatureStore
from captioner.training import TrainConfig, train

# A decoder that trains an epoch of the 24-image store in a fraction of a second.
SMALL = dict(
    embed_size=8, hidden_size=8, attention_size=4, min_count=1, batch_size=6, lr=0.01, workers=0
)  # fmt: skip
SMALL_ARGUMENTS = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
TEST_NAN_ROW = 20  # rows of the 24-image store: train 0-11, val 12-17, test 18-23
TRAIN_NAN_ROW = 5


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    # Row 1 failed at extraction: its NaN is the store's own marking, never a fault.
    return make_store(tmp_path_factory.mktemp("finite") / "s.zarr", images=24, failed=[1])


def with_nan(store: Path, copy: Path, row: int, array: str = "spatial") -> Path:
    """A copy of `store` with one value of `row` of `array` set to NaN, written with zarr as any
    faulty writer could."""
    shutil.copytree(store, copy)
    stored = zarr.open_group(str(copy), mode="r+")[array]
    values = stored[row]
    values.flat[3] = np.nan
    stored[row] = values
    return copy


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def the_error(result) -> str:
    """The one error line of a command that failed (exit status 1), without a traceback."""
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "Traceback" not in result.output
    return errors[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- features that are not finite ----


def test_reading_a_row_with_nan_is_refused_naming_it(store, tmp_path):
    copy = FeatureStore.open(with_nan(store, tmp_path / "nan.zarr", TRAIN_NAN_ROW, "pooled"))
    rows = np.array([0, TRAIN_NAN_ROW, 7])
    with pytest.raises(CaptionerError) as error:
        copy.read("pooled", rows)
    message = str(error.value)
    assert "\n" not in message and f"row {TRAIN_NAN_ROW} (img_005.jpg)" in message
    assert f"captioner features verify {copy.path}" in message
    assert np.isnan(copy.read_pooled(rows)[1]).any()  # the raw reader still reads what is there
    assert copy.read("spatial", rows).shape[0] == 3  # the spatial maps of that row are sound


def test_verify_names_the_rows_holding_nan_and_fails(store, tmp_path):
    assert invoke("features", "verify", store).exit_code == 0  # a failed row's NaN is no fault
    copy = with_nan(store, tmp_path / "nan.zarr", TRAIN_NAN_ROW)
    result = invoke("features", "verify", copy)
    error = the_error(result)
    assert "1 shard is damaged or holding NaN or inf" in error and "--repair" in error
    (line,) = result.stdout.splitlines()
    assert line == f"{copy}: spatial shard 1, row 5, holds NaN or inf (1 value): img_005.jpg"


def test_training_refuses_nan_features_and_an_earlier_run_keeps_its_files(store, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(features=store, out=run, model="show-attend-tell", epochs=1, **SMALL))
    kept = {name: digest(run / name) for name in ("last.pt", "best.pt", "metrics.jsonl")}
    copy = with_nan(store, tmp_path / "nan.zarr", TRAIN_NAN_ROW)  # the same images: resumable
    options = ["--model", "show-attend-tell", "--epochs", "2", *SMALL_ARGUMENTS]
    result = invoke("train", "--features", copy, "--out", run, "--resume", *options)
    error = the_error(result)
    assert f"NaN or inf in the spatial features of row {TRAIN_NAN_ROW} (img_005.jpg)" in error
    assert {name: digest(run / name) for name in kept} == kept
    # show-tell reads the pooled vectors; a new run stops before it writes anything
    pooled = with_nan(store, tmp_path / "pooled.zarr", TRAIN_NAN_ROW, "pooled")
    fresh = tmp_path / "fresh"
    result = invoke("train", "--features", pooled, "--out", fresh, "--model", "show-tell")
    assert f"NaN or inf in the pooled features of row {TRAIN_NAN_ROW}" in the_error(result)
    assert not fresh.exists()


def test_evaluate_refuses_nan_features_and_keeps_the_earlier_results(store, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "best.pt", store)
    out = tmp_path / "results"
    options = ["--checkpoint", checkpoint, "--out", out, "--metrics", "nltk-fallback"]
    assert invoke("evaluate", "--features", store, *options).exit_code == 0
    kept = {path.name: digest(path) for path in out.iterdir() if path.is_file()}
    copy = with_nan(store, tmp_path / "nan.zarr", TEST_NAN_ROW)
    error = the_error(invoke("evaluate", "--features", copy, *options))
    assert f"row {TEST_NAN_ROW} (img_020.jpg)" in error
    assert {path.name: digest(path) for path in out.iterdir() if path.is_file()} == kept
