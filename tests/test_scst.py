"""Self-critical sequence training: the log-probabilities it weighs against a plain step-by-step
reference, its baselines, learning (held-out reward rises over the cross-entropy start), exact
resume, and its refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import at_batch_of_epoch_2, make_store, without_timing

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.models import DecoderConfig, build_decoder
from captioner.models.decode import DecodingConfig, sample
from captioner.store import FeatureStore, split_rows, training_corpus
from captioner.text import END_ID, PAD_ID, START_ID
from captioner.training import TrainConfig, train
from captioner.training.batches import FeatureStream
from captioner.training.objectives import SelfCritical
from captioner.training.reward import CiderReward

SIZES = {"embed_size": 16, "hidden_size": 24, "attention_size": 8, "min_count": 1}
OPTIONS = {**SIZES, "batch_size": 20, "workers": 0, "device": "cpu", "dropout": 0.1}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(
        tmp_path_factory.mktemp("scst") / "store.zarr",
        images=80,
        captions_per_image=5,
        split_fractions=(0.6, 0.4, 0.0),
        images_per_shard=20,
        seed=3,
    )


@pytest.fixture(scope="module")
def cross_entropy_runs(store, tmp_path_factory) -> dict[str, Path]:
    """best.pt of a short cross-entropy run of each decoder: SCST's starting points."""
    root = tmp_path_factory.mktemp("xe")
    runs = {}
    for model in ("show-tell", "show-attend-tell"):
        config = TrainConfig(store, root / model, model=model, epochs=3, lr=0.01, **OPTIONS)
        runs[model] = train(config).best_checkpoint
    return runs


@pytest.mark.parametrize("model", ["show-tell", "show-attend-tell", "transformer"])
def test_caption_log_probs_equal_the_step_by_step_sums_and_their_gradients(model):
    """What SCST weighs by the reward, against summing decoder.step over each caption (with
    <pad> and <start> ruled out, as sampling rules them out); captions that ended (with <end>)
    and captions cut off at the length limit (without) alike."""
    torch.manual_seed(0)
    sizes = (
        dict(embed_size=16, hidden_size=16, decoder_layers=2, heads=2, ff_size=24)
        if model == "transformer"
        else dict(embed_size=10, hidden_size=14, attention_size=6)
    )
    decoder = build_decoder(DecoderConfig(model, 30, 12, dropout=0.0, **sizes))
    features = torch.randn(3, 4, 12)
    features = features.mean(1) if decoder.feature_kind == "pooled" else features
    words = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [6], [7, 7, 7], [9, 10]]
    ended = [True, False, True, True, False, True]
    sequences = [
        [START_ID, *w, *([END_ID] if e else [])] for w, e in zip(words, ended, strict=True)
    ]
    captions = torch.full((6, max(map(len, sequences))), PAD_ID)
    for row, sequence in enumerate(sequences):
        captions[row, : len(sequence)] = torch.tensor(sequence)
    lengths = torch.tensor([len(s) for s in sequences])
    image_index = torch.arange(3).repeat_interleave(2)

    fast = decoder.caption_log_probs(features, image_index, captions, lengths)
    parameters = list(decoder.parameters())
    fast_grads = torch.autograd.grad(fast.sum() + fast[1], parameters, allow_unused=True)

    memory = decoder.encode(features)
    state = tuple(s.repeat_interleave(2, 0) for s in decoder.init_state(memory))
    tokens, plain = captions[:, 0], torch.zeros(6)
    for step in range(1, captions.size(1)):
        log_probs, state, _ = decoder.step(tokens, state, memory)
        # as sampling draws: never <pad> or <start>, the rest renormalized
        never = torch.tensor([PAD_ID, START_ID])
        log_probs = log_probs.index_fill(1, never, float("-inf")).log_softmax(1)
        tokens = captions[:, step]
        real = step < lengths
        plain = plain + torch.where(real, log_probs.gather(1, tokens[:, None])[:, 0], 0.0)
    plain_grads = torch.autograd.grad(plain.sum() + plain[1], parameters, allow_unused=True)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(fast_grads, plain_grads, strict=True):
        if theirs is None:
            assert ours is None or not ours.any()
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_the_samples_of_image_i_are_rows_i_k_to_i_k_plus_k_and_differ():
    """k samples per image share its memory: their log-probabilities, as the sampler reports
    them, are those of teacher forcing each sample on its own image."""
    torch.manual_seed(0)
    decoder = build_decoder(DecoderConfig("show-attend-tell", 20, 8, 8, 8, 4)).eval()
    features = torch.randn(3, 4, 8) * torch.tensor([1.0, 5.0, -5.0])[:, None, None]
    k = 4
    drawn = sample(decoder, features, DecodingConfig("sample", max_length=6, seed=1), k)
    assert len(drawn) == 12 and len({tuple(c.tokens) for c in drawn}) > 4
    assert all(c.ended == (len(c.tokens) < 6) for c in drawn)
    sequences = [[START_ID, *c.tokens, *([END_ID] if c.ended else [])] for c in drawn]
    captions = torch.full((12, max(map(len, sequences))), PAD_ID)
    for row, sequence in enumerate(sequences):
        captions[row, : len(sequence)] = torch.tensor(sequence)
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    with torch.no_grad():
        log_probs = decoder.teacher_forced_log_probs(
            features, torch.arange(3).repeat_interleave(k), captions, lengths
        )
    targets = log_probs.gather(2, captions[:, 1:, None])[:, :, 0]
    real = torch.arange(captions.size(1) - 1) < (lengths - 1)[:, None]
    teacher_forced = torch.where(real, targets, 0.0).sum(1)
    reported = torch.tensor([c.log_prob for c in drawn])
    torch.testing.assert_close(teacher_forced, reported, rtol=1e-5, atol=1e-5)


def held_out_reward(checkpoint_path: Path, store: Path) -> float:
    """Mean CIDEr-D reward of 5 seeded samples per validation image."""
    checkpoint, _ = load_checkpoint(checkpoint_path)
    feature_store = FeatureStore.open(store)
    corpus = training_corpus(feature_store, None)
    rows = split_rows(corpus, feature_store, "val")
    decoder = checkpoint.build_decoder()
    reward = CiderReward(corpus, rows.tolist(), checkpoint.vocabulary)
    features = torch.from_numpy(feature_store.read(decoder.feature_kind, rows)).float()
    drawn = sample(decoder, features, DecodingConfig("sample", max_length=20, seed=0), 5)
    return float(reward(drawn, np.repeat(rows, 5)).mean())


@pytest.mark.parametrize("model", ["show-tell", "show-attend-tell"])
def test_scst_raises_the_held_out_reward_over_its_cross_entropy_start(
    store, cross_entropy_runs, tmp_path, model
):
    config = TrainConfig(
        store,
        tmp_path / "scst",
        model=model,
        objective="scst",
        init=cross_entropy_runs[model],
        epochs=3,
        lr=3e-3,
        **OPTIONS,
    )
    result = train(config)
    start, *rows = result.history  # epoch 0: the starting weights' validation
    assert (
        start["epoch"] == 0
        and "mean_reward" not in start
        and [r["epoch"] for r in rows]
        == [
            1,
            2,
            3,
        ]
    )
    assert result.selection_metric == "val_cider" and all("mean_reward" in row for row in rows)
    assert rows[-1]["mean_reward"] > rows[0]["mean_reward"]
    initial = cross_entropy_runs[model]
    before = held_out_reward(initial, store)
    after = held_out_reward(result.last_checkpoint, store)
    assert after > before * 1.05, (before, after)
    # it fine-tuned the start: same vocabulary and sizes, no dropout, its own options recorded
    checkpoint, _ = load_checkpoint(result.last_checkpoint)
    assert checkpoint.vocabulary.words == load_checkpoint(initial)[0].vocabulary.words
    assert checkpoint.decoder_config.dropout == 0.0
    assert checkpoint.training["options"]["objective"] == "scst"
    assert checkpoint.training["options"]["lr"] == 3e-3


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(
    store, cross_entropy_runs, tmp_path, monkeypatch
):
    """Greedy baseline; killed at batch 2 of epoch 2 with last.pt written every step, and resumed
    with --init moved away (a resumed run reads only last.pt): the same samples are drawn."""
    init = tmp_path / "xe.pt"
    shutil.copy(cross_entropy_runs["show-attend-tell"], init)
    common = dict(
        model="show-attend-tell", objective="scst", scst_baseline="greedy", init=init,
        epochs=2, checkpoint_minutes=0.0, **OPTIONS,
    )  # fmt: skip
    whole = train(TrainConfig(store, tmp_path / "whole", **common))

    def power_cut() -> None:
        raise RuntimeError("power cut")

    original = FeatureStream.epoch
    monkeypatch.setattr(FeatureStream, "epoch", at_batch_of_epoch_2(2, power_cut))
    with pytest.raises(RuntimeError, match="power cut"):
        train(TrainConfig(store, tmp_path / "cut", **common))
    monkeypatch.setattr(FeatureStream, "epoch", original)
    training = load_checkpoint(tmp_path / "cut" / "last.pt")[0].training
    assert (training["epoch"], training["step"]) == (1, 2)
    init.unlink()
    resumed = train(TrainConfig(store, tmp_path / "cut", resume=True, **common))
    assert without_timing(resumed.history) == without_timing(whole.history)
    ours, theirs = (load_checkpoint(r.last_checkpoint)[0].state_dict for r in (resumed, whole))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)


def test_the_mean_baseline_is_the_mean_of_the_other_samples():
    objective = SelfCritical(None, None, samples=3, baseline="mean", max_length=20)
    rewards = np.array([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    baselines = objective._baselines(rewards, torch.zeros(2, 4), np.array([7, 8]))
    np.testing.assert_allclose(baselines, [4.0, 3.5, 1.5, 1.5, 1.5, 0.0])


def test_best_pt_keeps_the_start_when_training_makes_it_worse(store, cross_entropy_runs, tmp_path):
    """At a learning rate that wrecks the decoder, no epoch beats epoch 0 (the start): best.pt
    holds the starting weights."""
    init = cross_entropy_runs["show-tell"]
    config = TrainConfig(
        store, tmp_path / "run", model="show-tell", objective="scst", init=init, epochs=1,
        lr=5.0, **OPTIONS,
    )  # fmt: skip
    result = train(config)
    assert result.best_epoch == 0 and result.history[1]["val_cider"] < result.best_score
    best, start = (load_checkpoint(path)[0].state_dict for path in (result.best_checkpoint, init))
    for name in start:
        torch.testing.assert_close(best[name], start[name], rtol=0, atol=0)


def run_cli(*args: str):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def test_refusals_are_one_line(store, cross_entropy_runs, tmp_path):
    attention = cross_entropy_runs["show-attend-tell"]
    cases = {
        "--init runs/NAME/best.pt": ["--objective", "scst"],
        "only --objective scst starts from a checkpoint": ["--init", attention],
        "holds a show-attend-tell decoder, not show-tell; pass --model show-attend-tell": [
            "--objective",
            "scst",
            "--init",
            attention,
            "--model",
            "show-tell",
        ],
        "trained on another feature store": [
            "--objective",
            "scst",
            "--init",
            attention,
            "--features",
            make_store(tmp_path / "other.zarr", images=12, seed=9),
        ],
        "--scst-samples": ["--objective", "scst", "--init", attention, "--scst-samples", "1"],
    }
    for expected, args in cases.items():
        result = run_cli("--features", store, "--out", tmp_path / "run", "--device", "cpu", *args)
        assert result.exit_code != 0, expected
        assert expected in result.output and "Traceback" not in result.output, result.output
        if result.exit_code == 1:  # ours; 2 is click's usage error for a value out of range
            assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "run" / "last.pt").exists()


def test_the_cli_prints_the_best_cider(store, cross_entropy_runs, tmp_path):
    result = run_cli(
        "--features",
        store,
        "--out",
        tmp_path / "run",
        "--objective",
        "scst",
        "--init",
        cross_entropy_runs["show-tell"],
        "--model",
        "show-tell",
        "--epochs",
        "1",
        "--batch-size",
        "40",
        "--workers",
        "0",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "best val CIDEr-D" in result.output
    start, row = map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert start["epoch"] == 0 and "start: val loss" in result.output
    assert {"mean_reward", "val_cider", "val_bleu4", "objective"} <= set(row)
    assert "train_loss" not in row
