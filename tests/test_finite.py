"""Never silently wrong: NaN or inf in a store's features, in a training step or its metrics, or in
a checkpoint's weights stops the command in one line, keeping what was already written; empty
captions are captions like any other. (Extraction's own check is in test_extract.py, decoding's
in test_decode.py.)"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from factories import at_batch_of_epoch_2, make_store, write_split_pictures
from inference_factories import make_checkpoint, report_data
from PIL import Image

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.cli import main
from captioner.encoder import EncoderConfig, build_encoder
from captioner.errors import CaptionerError
from captioner.store import FeatureStore
from captioner.text import END_ID
from captioner.training import TrainConfig, train
from captioner.training import loop as loop_module
from captioner.training.batches import FeatureStream
from captioner.training.objectives import CrossEntropy, StepOutput
from captioner.training.validation import Validation

REPO = Path(__file__).resolve().parents[1]
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


def strict_rows(run: Path) -> list[dict]:
    """metrics.jsonl read as strict JSON: a bare NaN or Infinity fails the test."""

    def refuse(constant: str):
        raise AssertionError(f"metrics.jsonl holds {constant}: not JSON")

    text = (run / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


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


# ---- a loss, metrics or weights that are not finite ----


def test_a_nan_loss_stops_training_at_once_and_keeps_the_last_good_checkpoints(
    store, tmp_path, monkeypatch
):
    """NaN at step 2 of epoch 2: one line naming the step; last.pt and best.pt stay epoch 1's,
    metrics.jsonl stays JSON and ends with the failure, which `captioner runs` shows."""
    run = tmp_path / "run"
    saved: dict[str, str] = {}
    poisoned = []

    def at_step_2_of_epoch_2():
        saved.update({name: digest(run / name) for name in ("last.pt", "best.pt")})
        poisoned.append(True)

    forward = CrossEntropy.forward

    def forward_going_nan(self, batch) -> StepOutput:
        output = forward(self, batch)
        return output._replace(loss=output.loss * float("nan")) if poisoned else output

    monkeypatch.setattr(FeatureStream, "epoch", at_batch_of_epoch_2(1, at_step_2_of_epoch_2))
    monkeypatch.setattr(CrossEntropy, "forward", forward_going_nan)
    result = invoke("train", "--features", store, "--out", run, "--epochs", "3", *SMALL_ARGUMENTS)
    error = the_error(result)
    assert "training stopped at epoch 2 step 2" in error
    assert "lower --lr (this run's: 0.01)" in error and "captioner features verify" in error
    assert {name: digest(run / name) for name in saved} == saved
    assert load_checkpoint(run / "last.pt")[0].training["epoch"] == 1
    rows = strict_rows(run)
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[-1] == {"epoch": 2, "step": 2, "failed": "the loss or its gradient is NaN or inf"}

    result = invoke("runs", run, "--out", tmp_path / "runs.png")
    assert result.exit_code == 0, result.output
    table, failure = result.output.splitlines()[1], result.output.splitlines()[2]
    cells = re.split(r" {2,}", table.strip())  # (the sizes cell holds single spaces)
    assert cells[-1] == "failed" and cells[5:7] == ["1", "1"]
    assert failure == f"{run}: failed at epoch 2 step 2: the loss or its gradient is NaN or inf"


def test_a_learning_rate_that_diverges_stops_the_run_before_it_saves_anything(store, tmp_path):
    run = tmp_path / "run"
    options = [*SMALL_ARGUMENTS, "--lr", "1e30"]  # (the later --lr wins)
    error = the_error(invoke("train", "--features", store, "--out", run, *options))
    assert "training stopped at epoch 1 step 2" in error and "no checkpoint was written" in error
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()
    assert strict_rows(run) == [
        {"epoch": 1, "step": 2, "failed": "the loss or its gradient is NaN or inf"}
    ]


def test_metrics_that_are_not_finite_are_null_and_no_best_pt_comes_of_them(
    store, tmp_path, monkeypatch
):
    validate = loop_module.validate

    def validate_going_nan(decoder, stream, *rest) -> Validation:
        validation = validate(decoder, stream, *rest)
        if (tmp_path / "run" / "last.pt").exists():  # from the second epoch on
            validation.loss = float("nan")
        return validation

    monkeypatch.setattr(loop_module, "validate", validate_going_nan)
    run = tmp_path / "run"
    with pytest.raises(CaptionerError, match="stopped at epoch 2: its metrics are not finite"):
        train(TrainConfig(features=store, out=run, model="show-tell", epochs=3, **SMALL))
    epoch_1, epoch_2, failure = strict_rows(run)
    assert epoch_2["val_loss"] is None and epoch_2["val_ppl"] is None
    assert epoch_2["train_loss"] > 0 and failure["epoch"] == 2 and failure["step"] is None
    assert load_checkpoint(run / "best.pt")[0].training["epoch"] == 1
    assert load_checkpoint(run / "last.pt")[0].training["epoch"] == 1


def test_weights_that_are_not_finite_are_never_saved(store, tmp_path, monkeypatch):
    validate = loop_module.validate

    def validate_then_break_a_weight(decoder, *rest) -> Validation:
        validation = validate(decoder, *rest)
        with torch.no_grad():
            decoder.head[1].weight[0, 0] = float("nan")
        return validation

    monkeypatch.setattr(loop_module, "validate", validate_then_break_a_weight)
    run = tmp_path / "run"
    with pytest.raises(CaptionerError, match="the weights to save in best.pt are not finite"):
        train(TrainConfig(features=store, out=run, model="show-tell", epochs=1, **SMALL))
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists()


# Runs train_decoder.py with rank 1's loss NaN at its second step, its gradient finite: rank 0
# sees nothing wrong, neither in its own loss nor in the gradients DDP averages.
RANK_1_GOES_NAN = """
import os, runpy, sys
from captioner.training.objectives import CrossEntropy
forward, calls = CrossEntropy.forward, []
def forward_going_nan(self, batch):
    output = forward(self, batch)
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        return output._replace(loss=output.loss + (float("nan") - output.loss.detach()))
    return output
CrossEntropy.forward = forward_going_nan
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
    reason="torchrun is not installed",
)
def test_under_torchrun_every_rank_stops_at_the_step_one_rank_goes_nan(store, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "--no-python"]
    command += [sys.executable, "-c", RANK_1_GOES_NAN, str(REPO / "train_decoder.py")]
    command += ["--features", str(store), "--out", str(tmp_path / "run"), "--device", "cpu"]
    completed = subprocess.run(
        [*command, *SMALL_ARGUMENTS],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,  # a rank left waiting in a collective would hang far longer
    )
    assert completed.returncode != 0
    # Rank 0 stopped at that step too, and recorded it (rank 1 says the same, unless torchrun
    # ends it first, once rank 0 has exited); alone, it would have waited for rank 1 at step 3.
    errors = [line for line in completed.stderr.splitlines() if line.startswith("Error: ")]
    assert errors and all("training stopped at epoch 1 step 2" in line for line in errors)
    assert "lost the other processes" not in completed.stderr
    assert strict_rows(tmp_path / "run")[-1]["step"] == 2


def test_a_checkpoint_with_weights_that_are_not_finite_is_refused(store, tmp_path):
    checkpoint, _ = load_checkpoint(make_checkpoint(tmp_path / "ok.pt", store))
    checkpoint.state_dict["head.1.bias"][3] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", checkpoint)
    said = "nan.pt: its weights are not finite (NaN or inf in head.1.bias)"
    bad = ["--checkpoint", tmp_path / "nan.pt"]
    evaluated = invoke("evaluate", *bad, "--features", store, "--out", tmp_path / "e")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(pictures / "red.jpg")
    captioned = invoke("caption", pictures, *bad, "--out", tmp_path / "c.csv")
    scst = ["--objective", "scst", "--init", tmp_path / "nan.pt", "--model", "show-attend-tell"]
    trained = invoke("train", "--features", store, "--out", tmp_path / "scst", *scst)
    assert all(said in the_error(result) for result in (evaluated, captioned, trained))
    assert not any((tmp_path / name).exists() for name in ("e", "c.csv", "scst"))


# ---- empty captions ----


def ending_at_once(checkpoint: Path, out: Path) -> Path:
    """`checkpoint` with its end token's logit raised so far that every caption is empty."""
    loaded, _ = load_checkpoint(checkpoint)
    loaded.state_dict["head.1.bias"][END_ID] += 1000.0
    save_checkpoint(out, loaded)
    return out


def test_empty_captions_are_evaluated_drawn_and_reported(store, tmp_path):
    checkpoint = ending_at_once(make_checkpoint(tmp_path / "a.pt", store), tmp_path / "empty.pt")
    out, pictures = tmp_path / "results", write_split_pictures(store, tmp_path / "pictures")
    result = invoke(
        "evaluate", "--checkpoint", checkpoint, "--features", store, "--out", out,
        "--metrics", "nltk-fallback", "--visualize", 2, "--images", pictures,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with open(out / "captions.csv", newline="") as file:
        assert [row["caption"] for row in csv.DictReader(file)] == [""] * 6
    assert json.loads((out / "metrics.json").read_text())["metrics"]["CIDEr-D"] == 0.0
    assert len(list((out / "attention").glob("*.png"))) == 2  # a panel saying it is empty
    cards = report_data(out / "report.html")["cards"]
    assert [card["caption"] for card in cards] == [""] * 6 and all("thumb" in c for c in cards)


def test_empty_captions_are_written_shown_and_scored(tmp_path):
    tiny = build_encoder(EncoderConfig("tiny", "none", 64))  # what `caption` runs
    store = make_store(
        tmp_path / "s.zarr", images=8, channels=128, weights_checksum=tiny.weights_checksum
    )
    checkpoint = ending_at_once(make_checkpoint(tmp_path / "a.pt", store), tmp_path / "empty.pt")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for name, colour in (("red.jpg", (200, 30, 30)), ("blue.png", (20, 30, 200))):
        Image.new("RGB", (50, 40), colour).save(pictures / name)
    out, page = tmp_path / "captions.csv", tmp_path / "gallery.html"
    options = ["--checkpoint", checkpoint, "--out", out, "--html", page, "--workers", 0]
    result = invoke("caption", pictures, *options)
    assert result.exit_code == 0, result.output
    with open(out, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["caption"], row["error"]) for row in rows] == [("", ""), ("", "")]
    assert [card["caption"] for card in report_data(page)["cards"]] == ["", ""]

    references = tmp_path / "captions.csv"
    references.write_text("image,caption,split\na.jpg,A red square.,test\nb.jpg,A dog.,test\n")
    predictions = tmp_path / "theirs.csv"
    predictions.write_text('image,caption\na.jpg,""\nb.jpg,a dog\n')
    result = invoke(
        "score", "--predictions", predictions, "--captions", references,
        "--out", tmp_path / "scored", "--metrics", "nltk-fallback",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cards = {card["id"]: card for card in report_data(tmp_path / "scored" / "report.html")["cards"]}
    assert cards["a.jpg"]["caption"] == "" and cards["a.jpg"]["scores"]["CIDEr-D"] == 0.0
