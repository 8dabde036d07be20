"""Phase-2 training end to end: the CLI, outputs, checkpoints, exact resume after SIGKILL,
refusals, early stopping, a caption-file override, 2-process DDP on gloo, and the learning-rate
schedule."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner
from factories import at_batch_of_epoch_2, failing_on_call, make_store, without_timing
from PIL import Image

from captioner import visualize
from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.models.decode import greedy_decode
from captioner.store import FeatureStore, corpus_digest, training_corpus
from captioner.training import TrainConfig, resume, train
from captioner.training import loop as train_module
from captioner.training.batches import FeatureStream
from captioner.training.config import checked_config
from captioner.training.data import feature_statistics
from captioner.training.loop import seed_rank
from captioner.training.metrics_log import EpochTiming, describe_epoch
from captioner.training.schedule import LearningRateSchedule
from captioner.training.validation import repeated_word

REPO = Path(__file__).resolve().parents[1]
# A decoder small enough to train an epoch in a fraction of a second (the library's options).
SMALL = dict(
    embed_size=8, hidden_size=8, attention_size=4, min_count=1, batch_size=6, lr=0.01, workers=0
)
# The tiny decoder most command-line tests train, as options and as command-line arguments.
TINY_OPTIONS = dict(
    embed_size=16, hidden_size=24, attention_size=8, dropout=0.2, min_count=1, batch_size=12,
    lr=0.01, workers=1,
)  # fmt: skip
# The transformer's tiny sizes, and a warm-up that ends within a few epochs of three steps.
TRANSFORMER_OPTIONS = dict(d_model=16, layers=2, heads=2, ff_size=32, warmup_steps=5)
TINY_TRANSFORMER = {**TINY_OPTIONS, **TRANSFORMER_OPTIONS}


def arguments(options: dict) -> list[str]:
    """`options` as command-line arguments."""
    return [
        argument
        for name, value in options.items()
        for argument in (f"--{name.replace('_', '-')}", str(value))
    ]


TINY = arguments(TINY_OPTIONS)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("train") / "store.zarr", images=24, seed=0)


def run_cli(*args: str) -> subprocess.CompletedProcess | object:
    return CliRunner().invoke(main, ["train", *args], catch_exceptions=False)


def where(store: Path, run: Path) -> list[str]:
    """The two options every training command names: the store it reads, the run it writes."""
    return ["--features", str(store), "--out", str(run)]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def progress_of(run: Path) -> tuple[int, int]:
    """(epochs done, steps into the next) saved in last.pt; (-1, 0) before the first save."""
    try:
        training = torch.load(run / "last.pt", weights_only=True)["training"]
    except FileNotFoundError:
        return (-1, 0)
    return training["epoch"], training["step"]


@pytest.mark.parametrize("model", ["show-tell", "show-attend-tell"])
def test_both_lstms_train_end_to_end_via_the_cli(store, tmp_path, model):
    """(The transformer's run through the command line: the TensorBoard test.)"""
    run = tmp_path / "run"
    result = run_cli(*where(store, run), "--model", model, "--epochs", "4", *TINY)
    assert result.exit_code == 0, result.output
    assert "best val BLEU-4" in result.output
    rows = metrics(run)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    train_losses = [row["train_loss"] for row in rows]
    assert train_losses == sorted(train_losses, reverse=True)  # learning happens
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.2
    assert all(0.0 <= row["val_bleu4"] <= 1.0 and row["val_ppl"] > 1.0 for row in rows)
    assert (run / "curves.png").stat().st_size > 0 and (run / "vocab.json").is_file()
    attention_figures = sorted(p.name for p in (run / "attention").glob("*.png"))
    expected_figures = [f"epoch_00{e}.png" for e in range(1, 5)]
    assert attention_figures == (expected_figures if model == "show-attend-tell" else [])

    for name in ("best.pt", "last.pt"):
        payload = torch.load(run / name, map_location="cpu", weights_only=True)
        assert payload["store_fingerprint"] == FeatureStore.open(store).fingerprint
    checkpoint, _ = load_checkpoint(run / "best.pt")
    assert checkpoint.training["epoch"] == max(rows, key=lambda r: r["val_bleu4"])["epoch"]
    assert checkpoint.decoder_config.model == model
    decoder = checkpoint.build_decoder()
    opened = FeatureStore.open(store)
    rows_val = opened.split_indices("val")[:2]
    features = (
        opened.read_pooled(rows_val)
        if decoder.feature_kind == "pooled"
        else opened.read_spatial(rows_val)
    )
    captions = greedy_decode(decoder, torch.from_numpy(features).float(), max_length=8)
    assert len(captions) == 2


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(store, tmp_path, one_thread):
    """The transformer killed in epoch 2, in its warm-up, and resumed: the same weights and
    metrics rows, learning rates included, as a run never killed."""
    options = dict(
        model="transformer", epochs=4, seed=3, checkpoint_minutes=0.0, **TINY_TRANSFORMER
    )
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(TrainConfig(features=store, out=whole, **options))

    # The run to kill is a real process (SIGKILL: no cleanup of any kind), started by the CLI.
    arguments = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "train_decoder.py"),
            f"--features={store}",
            f"--out={killed}",
            *arguments,
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while progress_of(killed) < (1, 1):  # wait until a step of epoch 2 is saved, then kill
        assert process.poll() is None and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert progress_of(killed) < (4, 0)

    train(TrainConfig(features=store, out=killed, resume=True, **options))
    assert without_timing(metrics(killed)) == without_timing(metrics(whole))
    final = [load_checkpoint(run / "last.pt")[0].state_dict for run in (whole, killed)]
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])


def test_a_run_that_dies_mid_epoch_resumes_at_that_batch(store, tmp_path, monkeypatch):
    options = dict(
        features=store, model="show-tell", epochs=2, seed=1, checkpoint_minutes=0.0, **SMALL
    )
    whole = train(TrainConfig(out=tmp_path / "whole", **options))

    def power_cut() -> None:
        raise RuntimeError("power cut")

    original_epoch = FeatureStream.epoch
    monkeypatch.setattr(FeatureStream, "epoch", at_batch_of_epoch_2(4, power_cut))
    with pytest.raises(RuntimeError, match="power cut"):
        train(TrainConfig(out=tmp_path / "cut", **options))
    monkeypatch.setattr(FeatureStream, "epoch", original_epoch)
    training = load_checkpoint(tmp_path / "cut" / "last.pt")[0].training
    assert (training["epoch"], training["step"]) == (1, 4)

    resumed = train(TrainConfig(out=tmp_path / "cut", resume=True, **options))
    assert without_timing(resumed.history) == without_timing(whole.history)


@pytest.mark.parametrize(
    "sent, model", [(signal.SIGTERM, "transformer"), (signal.SIGINT, "show-attend-tell")]
)
def test_a_preempted_run_saves_the_step_in_hand_and_resumes_like_a_whole_one(
    store, tmp_path, monkeypatch, capsys, sent, model
):
    """SIGTERM (a scheduler's notice) or Ctrl-C: the step in hand ends, last.pt holds it, the
    command exits 0 saying how to resume, and the resumed run says where it goes on, times
    epoch 2 over the 2 steps it runs, and ends as an uninterrupted one."""
    sizes = {**TRANSFORMER_OPTIONS, "d_model": 8} if model == "transformer" else {}
    options = dict(features=store, model=model, epochs=2, seed=1, **SMALL, **sizes)
    whole = train(TrainConfig(out=tmp_path / "whole", **options))
    original_epoch = FeatureStream.epoch

    def signal_self() -> None:
        os.kill(os.getpid(), sent)

    monkeypatch.setattr(FeatureStream, "epoch", at_batch_of_epoch_2(3, signal_self))
    arguments = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    result = run_cli(*arguments, f"--out={tmp_path / 'cut'}")
    monkeypatch.setattr(FeatureStream, "epoch", original_epoch)
    assert result.exit_code == 0, result.output
    assert f"stopped by {sent.name} at epoch 2 step 4" in result.output
    assert "--resume" in result.output
    assert progress_of(tmp_path / "cut") == (1, 4)  # the step in hand was finished and saved
    assert signal.getsignal(sent) in (signal.SIG_DFL, signal.default_int_handler)

    capsys.readouterr()
    resumed = train(TrainConfig(out=tmp_path / "cut", resume=True, **options), progress=True)
    assert without_timing(resumed.history) == without_timing(whole.history)
    last = tmp_path / "cut" / "last.pt"
    assert f"resuming at epoch 2, step 4 of 6 from {last}" in capsys.readouterr().out
    timed = resumed.history[1]
    assert round(timed["captions_per_s"] * timed["seconds"]) == 2 * 6  # 2 batches of 6 captions
    assert 0 <= timed["data_wait"] < 1


def test_an_epoch_with_no_step_left_after_resuming_reports_no_speed():
    """A run stopped after the last step of an epoch resumes into none: nothing is timed, so the
    row has no speed columns (not 0 captions/s) and its line says why."""
    row = {"epoch": 2, "objective": 2.0, "train_loss": 2.0, "train_ppl": 7.4, "val_loss": 2.1}
    row |= {"val_ppl": 8.2, "val_bleu4": 0.1, "val_cider": 0.2, "sample": "a red circle"}
    row |= EpochTiming(seconds=0.0, data_wait=0.0, captions=0).columns()
    assert "captions_per_s" not in row and "data_wait" not in row
    assert "no step left to time after resuming" in describe_epoch(row, False, 2)
    timed = EpochTiming(seconds=2.0, data_wait=0.5, captions=100).columns()
    assert timed == {"captions_per_s": 50.0, "data_wait": 0.25, "seconds": 2.0}


@pytest.mark.parametrize(
    "module, writer, call, saved",
    [(resume, "save_checkpoint", 5, (0, 4)), (train_module, "write_metrics", 2, (1, 0))],
    ids=["checkpoint", "metrics"],
)
def test_a_full_disk_while_saving_is_one_line_and_the_resumed_run_ends_like_a_whole_one(
    store, tmp_path, monkeypatch, module, writer, call, saved
):
    options = dict(model="show-tell", epochs=2, seed=2, checkpoint_minutes=0.0, **SMALL)
    whole = train(TrainConfig(features=store, out=tmp_path / "whole", **options))
    original = getattr(module, writer)
    monkeypatch.setattr(module, writer, failing_on_call(call, errno.ENOSPC, original))
    arguments = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    result = run_cli(f"--features={store}", f"--out={tmp_path / 'full'}", *arguments)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines[-1].startswith("Error: "), result.output
    assert "No space left on device" in lines[-1] and "--resume" in lines[-1]
    monkeypatch.setattr(module, writer, original)
    assert progress_of(tmp_path / "full") == saved  # what was saved before the fault stays
    resumed = train(TrainConfig(features=store, out=tmp_path / "full", resume=True, **options))
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert without_timing(metrics(tmp_path / "full")) == without_timing(whole.history)


def test_resume_against_another_store_is_refused_in_one_line(store, tmp_path):
    run = tmp_path / "run"
    options = ["--out", str(run), "--model", "show-tell", *TINY]
    assert run_cli("--features", str(store), "--epochs", "1", *options).exit_code == 0
    other = make_store(tmp_path / "other.zarr", images=24, seed=1)

    result = run_cli("--features", str(other), "--epochs", "2", "--resume", *options)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "features do not match the run being resumed" in lines[0]

    again = run_cli("--features", str(store), "--epochs", "2", *options)  # no --resume
    assert again.exit_code == 1 and "already holds a run" in again.output
    changed = run_cli(
        "--features", str(store), "--epochs", "2", "--resume", "--seed", "9", *options
    )
    assert changed.exit_code == 1 and "--seed 0 -> 9" in changed.output
    assert len(metrics(run)) == 1  # nothing was lost or overwritten


def test_bucketed_attention_run_and_a_run_from_before_an_option_existed_resume(store, tmp_path):
    """--bucket-by-length trains and resumes; a last.pt written before an option existed resumes
    as a run with that option's default, and asking for another value is refused; a last.pt
    written before the objectives kept their totals resumes."""
    run = tmp_path / "run"
    options = ["--features", str(store), "--out", str(run), *TINY]
    assert run_cli("--epochs", "1", "--bucket-by-length", *options).exit_code == 0
    assert run_cli("--epochs", "2", "--bucket-by-length", "--resume", *options).exit_code == 0
    assert len(metrics(run)) == 2

    old = tmp_path / "old"
    assert run_cli("--epochs", "1", *options[:3], str(old), *TINY).exit_code == 0
    payload = torch.load(old / "last.pt", weights_only=True)
    # as written before --bucket-by-length and the objectives existed
    for option in ("bucket_by_length", "objective", "init", "scst_samples", "scst_baseline"):
        del payload["training"]["options"][option]
    for option in ("d_model", "layers", "heads", "ff_size", "encoder_layers", "warmup_steps"):
        del payload["training"]["options"][option]
    state = payload["extra"]["state"]
    (state["loss_sum"], state["nll_sum"], state["tokens"]) = state.pop("totals")
    state["best_bleu4"] = state.pop("best_score")
    del state["rank_totals"]  # (older still: before preemption kept every rank's sums)
    torch.save(payload, old / "last.pt")
    refused = run_cli(
        "--epochs", "2", "--resume", "--bucket-by-length", *options[:3], str(old), *TINY
    )
    assert refused.exit_code == 1 and "--bucket-by-length False -> True" in refused.output
    assert run_cli("--epochs", "2", "--resume", *options[:3], str(old), *TINY).exit_code == 0
    assert len(metrics(old)) == 2


def test_early_stop_and_the_store_copied_elsewhere(store, tmp_path):
    copy = tmp_path / "laptop" / "store.zarr"
    shutil.copytree(store, copy)  # a laptop needs nothing but the store
    config = TrainConfig(
        features=copy,
        out=tmp_path / "run",
        model="show-tell",
        epochs=6,
        early_stop=2,
        lr=1e-12,
        embed_size=8,
        hidden_size=8,
        min_count=1,
        batch_size=12,
        workers=0,
    )
    result = train(config)
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1


def test_a_caption_file_overrides_the_store_corpus(store, tmp_path):
    corpus = FeatureStore.open(store).corpus()
    lines = ["image,caption,split"] + [
        f"{image.path},A zebra {word} grazing .,{image.split}"
        for image in corpus.images
        for word in "xy"
    ]
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(lines) + "\n")
    result = run_cli(
        *where(store, tmp_path / "run"),
        "--captions",
        str(captions),
        "--model",
        "show-tell",
        "--epochs",
        "1",
        *TINY,
    )
    assert result.exit_code == 0, result.output
    words = json.loads((tmp_path / "run" / "vocab.json").read_text())["words"]
    assert "zebra" in words and "circle" not in words
    # the checkpoint records where its features and its corpus came from
    checkpoint, _ = load_checkpoint(tmp_path / "run" / "best.pt")
    settings = FeatureStore.open(store).settings
    assert (checkpoint.weights_id, checkpoint.weights_checksum) == (
        settings.weights_id,
        settings.weights_checksum,
    )
    trained = training_corpus(FeatureStore.open(store), captions)
    assert checkpoint.corpus_sha256 == corpus_digest(trained)
    assert checkpoint.corpus_sha256 != corpus_digest(FeatureStore.open(store).corpus())


def test_resuming_with_other_splits_is_refused(store, tmp_path):
    """The same words with other splits would train on what was held out: refused in one line."""
    corpus = FeatureStore.open(store).corpus()

    def captions_with_splits(name: str, flip: bool) -> Path:
        splits = {"train": "val", "val": "train"} if flip else {}
        lines = ["image,caption,split"] + [
            f"{image.path},A zebra grazing .,{splits.get(image.split, image.split)}"
            for image in corpus.images
        ]
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        return path

    options = [*where(store, tmp_path / "run"), "--model", "show-tell", *TINY]
    first = captions_with_splits("first.csv", flip=False)
    assert run_cli(*options, "--epochs", "1", "--captions", str(first)).exit_code == 0
    flipped = captions_with_splits("flipped.csv", flip=True)
    result = run_cli(*options, "--epochs", "2", "--resume", "--captions", str(flipped))
    assert result.exit_code == 1 and "captions or splits differ" in result.output
    assert run_cli(*options, "--epochs", "2", "--resume", "--captions", str(first)).exit_code == 0


def test_a_transformer_trains_and_tensorboard_gets_every_step_and_every_epoch(store, tmp_path):
    """Through the command line: it learns, draws its attention each epoch, saves best.pt to open
    with weights_only, and TensorBoard gets every step's learning rate (warmed up over 5 steps),
    as metrics.jsonl gets each epoch's last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    tiny = arguments(TINY_TRANSFORMER)
    result = run_cli(*where(store, run), "--model", "transformer", "--epochs", "3", *tiny)
    assert result.exit_code == 0, result.output
    rows = metrics(run)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.2
    attention_figures = sorted(path.name for path in (run / "attention").glob("*.png"))
    assert attention_figures == [f"epoch_00{epoch}.png" for epoch in (1, 2, 3)]
    payload = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert payload["decoder_config"]["model"] == "transformer"
    assert payload["decoder_config"]["hidden_size"] == TINY_TRANSFORMER["d_model"]
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    per_step = {
        f"train/{name}" for name in ("loss", "lr", "grad_norm", "captions_per_s", "data_wait")
    }
    assert per_step | {"val/loss", "val/bleu4", "epoch/train_loss"} <= scalars
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == list(range(1, 10))  # three epochs of three steps, each step
    val_loss = [event.value for event in events.Scalars("val/loss")]
    assert val_loss == pytest.approx([row["val_loss"] for row in metrics(run)])
    assert [image.step for image in events.Images("val/attention")] == [1, 2, 3]

    schedule = LearningRateSchedule(TINY_TRANSFORMER["lr"], TINY_TRANSFORMER["warmup_steps"])
    rates = [event.value for event in events.Scalars("train/lr")]
    assert rates == pytest.approx([schedule.rate(step) for step in steps])
    assert rates[0] < rates[1] < rates[4] == rates[8]  # up to --lr at step 5, then constant
    assert [row["lr"] for row in rows] == [schedule.rate(step) for step in (3, 6, 9)]


def test_the_learning_rate_rises_over_the_warm_up_then_stays():
    schedule = LearningRateSchedule(lr=1e-3, warmup_steps=4)
    assert [schedule.rate(step) for step in (1, 2, 3, 4, 5, 10**6)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    )
    constant = LearningRateSchedule(lr=1e-3, warmup_steps=0)
    assert constant.rate(1) == constant.rate(10**6) == 1e-3


def test_the_transformer_options_are_checked_and_their_defaults_are_the_models(store, tmp_path):
    refusals = {
        "--d-model 20 is not divisible by --heads 8": ["--d-model", "20", "--heads", "8"],
        "--max-length 64: the transformer has positions for at most 63 words": [
            "--max-length",
            "64",
        ],
    }
    for expected, options in refusals.items():
        result = run_cli(*where(store, tmp_path / "run"), "--model", "transformer", *options)
        lines = result.output.splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert lines[0].startswith(f"Error: {expected}"), result.output
    assert not (tmp_path / "run").exists()

    help_text = " ".join(run_cli("--help").output.split())
    assert "--dropout FLOAT RANGE Dropout" in help_text
    for option, defaults in (
        ("dropout", "0.5 (LSTMs), 0.1 (transformer)"),
        ("lr", "xe 0.0004 (LSTMs), 0.0003 (transformer); scst 5e-05 (LSTMs), 1e-05"),
        ("warmup_steps", "xe 0 (LSTMs), 1000 (transformer); scst 0"),
    ):
        assert defaults in help_text, option
    filled = checked_config(TrainConfig(store, tmp_path / "run", model="transformer"))
    assert (filled.dropout, filled.lr, filled.warmup_steps) == (0.1, 3e-4, 1000)
    lstm = checked_config(TrainConfig(store, tmp_path / "run", model="show-tell", dropout=0.2))
    assert (lstm.dropout, lstm.lr, lstm.warmup_steps) == (0.2, 4e-4, 0)


def test_without_tensorboard_training_says_so_once_and_goes_on(store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    result = run_cli(
        *where(store, tmp_path / "run"), "--epochs", "2", "--model", "show-tell", *TINY
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("not logging to TensorBoard") == 1
    assert len(metrics(tmp_path / "run")) == 2


def test_attention_maps_overlay_the_image_when_it_is_reachable(tmp_path, monkeypatch):
    path = make_store(tmp_path / "store.zarr", images=12)
    images = tmp_path / "images"
    images.mkdir()
    for image in FeatureStore.open(path).corpus().images:
        Image.new("RGB", (40, 30), "orange").save(images / image.path)
    zarr.open_group(str(path), mode="r+").attrs["images_root"] = str(images)
    drawn = []
    monkeypatch.setattr(visualize, "save_attention_figure", lambda *args: drawn.append(args[4]))
    config = TrainConfig(
        features=path,
        out=tmp_path / "run",
        epochs=1,
        embed_size=8,
        hidden_size=8,
        attention_size=4,
        min_count=1,
        workers=0,
    )
    train(config)
    shutil.rmtree(images)
    train(dataclasses.replace(config, out=tmp_path / "run2"))
    assert drawn[0].size == (40, 30) and drawn[1] is None  # overlay, then grid heatmaps


def test_each_rank_draws_its_own_dropout_and_rank_0_trains_as_a_single_process():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    seed_rank(3, 0)
    assert torch.equal(torch.get_rng_state(), before)
    draws = []
    for rank in (0, 1, 2):
        torch.manual_seed(3)
        seed_rank(3, rank)
        draws.append(torch.rand(8))
    assert not any(torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])


def test_repeated_word_flags_a_collapsing_decoder():
    assert repeated_word("a dog dog dog runs".split()) == "dog"
    assert repeated_word("a dog dog runs dog".split()) is None


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
    reason="torchrun is not installed",
)
def test_two_process_ddp_on_gloo_trains_and_writes_a_checkpoint(store, tmp_path):
    """The transformer (the attention LSTM runs under torchrun in the SIGTERM test below), then
    self-critical fine-tuning of it, which takes its sizes from --init."""
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"

    def two_processes(*options: str) -> subprocess.CompletedProcess:
        command = [str(torchrun), "--standalone", "--nproc_per_node=2"]
        command += [str(REPO / "train_decoder.py"), "--features", str(store), "--device", "cpu"]
        command += ["--model", "transformer"]
        return subprocess.run(
            [*command, *options],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )

    tiny = arguments(TINY_TRANSFORMER)
    completed = two_processes("--out", str(run), "--epochs", "2", *tiny)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = metrics(run)
    assert [row["ranks"] for row in rows] == [2, 2]
    checkpoint, extra = load_checkpoint(run / "last.pt")
    assert checkpoint.training["epoch"] == 2 and len(extra["rng"]) == 2

    # self-critical fine-tuning of that run, on the same two processes, at the default sizes
    scst = ["--objective", "scst", "--init", str(run / "best.pt"), "--batch-size", "12"]
    scst += ["--workers", "1"]
    completed = two_processes("--out", str(tmp_path / "scst"), "--epochs", "1", *scst)
    assert completed.returncode == 0, completed.stderr[-3000:]
    start, row = metrics(tmp_path / "scst")  # epoch 0 (the start) and epoch 1
    assert start["epoch"] == 0 and row["ranks"] == 2 and row["mean_reward"] > 0
    assert row["lr"] == 1e-5  # the transformer's self-critical rate, without warm-up
    tuned = load_checkpoint(tmp_path / "scst" / "last.pt")[0]
    assert tuned.decoder_config == dataclasses.replace(checkpoint.decoder_config, dropout=0.0)
    assert tuned.vocabulary.words == checkpoint.vocabulary.words


# train_decoder.py with a slowed-down step, so that a signal lands mid-epoch.
SLOW_TRAIN = """
import runpy, sys, time
import captioner.training.loop as train
step = train._optimizer_step
def slow_step(run, batch):
    time.sleep(0.3)
    return step(run, batch)
train._optimizer_step = slow_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
    reason="torchrun is not installed",
)
def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_the_run_resumes(store, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    # batches of one image: six slowed steps per rank in an epoch, so the signal lands mid-epoch
    options = [
        "--features",
        str(store),
        "--model",
        "show-attend-tell",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--seed",
        "4",
        *TINY[:-2],
        "--workers",
        "0",
        "--batch-size",
        "3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out: Path, *extra: str, slow: bool = False) -> subprocess.Popen:
        script = (
            ["-c", SLOW_TRAIN, str(REPO / "train_decoder.py")]
            if slow
            else [str(REPO / "train_decoder.py")]
        )
        command = [str(torchrun), "--standalone", "--nproc_per_node=2"]
        if slow:
            command += ["--no-python", sys.executable]
        return subprocess.Popen(
            [*command, *script, *options, "--out", str(out), *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    whole = launch(tmp_path / "whole")
    assert whole.wait(timeout=180) == 0, whole.stdout.read()[-3000:]
    cut = launch(tmp_path / "cut", slow=True)
    deadline = time.monotonic() + 180
    while progress_of(tmp_path / "cut") < (1, 0):  # epoch 1 done: signal during epoch 2
        assert cut.poll() is None and time.monotonic() < deadline, cut.stdout.read()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2's first steps (0.3 s each), well before its sixth
    cut.send_signal(signal.SIGTERM)
    output = cut.communicate(timeout=120)[0]
    assert "stopped by SIGTERM at epoch 2" in output, output[-3000:]
    epoch, step = progress_of(tmp_path / "cut")
    assert epoch == 1 and step >= 1  # saved mid-epoch, at the step both ranks reached
    resumed = launch(tmp_path / "cut", "--resume")
    assert resumed.wait(timeout=180) == 0, resumed.stdout.read()[-3000:]
    assert without_timing(metrics(tmp_path / "cut")) == without_timing(metrics(tmp_path / "whole"))


# train_decoder.py whose rank 1 dies (as if killed by the OOM killer) at its second step.
RANK_1_DIES = """
import os, runpy, sys
import captioner.training.loop as train
step, calls = train._optimizer_step, []
def dying_step(run, batch):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        os._exit(9)
    return step(run, batch)
train._optimizer_step = dying_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_when_a_rank_dies_the_others_stop_with_one_line_at_once(store, tmp_path):
    """Launched without torchrun (which would stop the others itself), the surviving rank sees
    the dead one's connection close and says so in one line instead of waiting or a traceback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    RANK_1_DIES,
                    str(REPO / "train_decoder.py"),
                    *where(store, tmp_path / "run"),
                    "--epochs",
                    "2",
                    "--device",
                    "cpu",
                    *TINY,
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    assert processes[1].wait(timeout=120) == 9
    output = processes[0].communicate(timeout=60)[0]
    last = output.strip().splitlines()[-1]
    assert processes[0].returncode == 1 and last.startswith("Error: rank 0: lost the other")
    assert "Traceback" not in output


def test_training_standardizes_features_with_the_train_split_statistics(store, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(
        features=store,
        out=run,
        model="show-tell",
        epochs=1,
        batch_size=12,
        embed_size=16,
        hidden_size=24,
        min_count=1,
        workers=0,
    )
    train(config)
    decoder = load_checkpoint(run / "best.pt")[0].build_decoder()
    opened = FeatureStore.open(store)
    pooled = opened.read_pooled(opened.split_indices("train"))
    torch.testing.assert_close(decoder.feature_mean, torch.from_numpy(pooled.mean(0)))
    torch.testing.assert_close(decoder.feature_std, torch.from_numpy(pooled.std(0)))


def test_spatial_statistics_cover_every_region_and_floor_dead_channels(store):
    opened = FeatureStore.open(store)
    rows = opened.split_indices("train")
    maps = opened.read_spatial(rows).astype("float64")
    maps = maps.reshape(-1, maps.shape[-1])
    mean, std = feature_statistics(opened, rows, "spatial")
    torch.testing.assert_close(mean, torch.from_numpy(maps.mean(0)).float())
    torch.testing.assert_close(std, torch.from_numpy(maps.std(0)).float())

    class DeadChannel:  # the store with its first channel always zero
        grid, channels = opened.grid, opened.channels

        def read(self, kind, rows):
            maps = opened.read(kind, rows).copy()
            maps[..., 0] = 0
            return maps

    _, std = feature_statistics(DeadChannel(), rows, "spatial")
    assert float(std[0]) == pytest.approx(0.1 * float(std[1:].median()), rel=0.2)

    class MostlyDead(DeadChannel):  # all channels but one always zero: the median std is 0
        def read(self, kind, rows):
            maps = opened.read(kind, rows).copy()
            maps[..., 1:] = 0
            return maps

    _, std = feature_statistics(MostlyDead(), rows, "spatial")
    assert float(std[1:].min()) == pytest.approx(0.1 * float(std[0]))
