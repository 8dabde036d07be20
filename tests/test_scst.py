"""Self-critical sequence training: the log-probabilities it weighs against a plain step-by-step
reference, its baselines, learning (held-out reward rises over the cross-entropy start), exact
resume, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import make_store

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.decode import DecodingConfig, sample
from captioner.models import DecoderConfig, build_decoder
from captioner.store import FeatureStore
from captioner.text import END_ID, PAD_ID, START_ID
from captioner.training import TrainConfig, train
from captioner.training.data import split_rows, training_corpus
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


@pytest.mark.parametrize("model", ["show-tell", "show-attend-tell"])
def test_caption_log_probs_equal_the_step_by_step_sums_and_their_gradients(model):
    """What SCST weighs by the reward, against summing decoder.step over each caption; captions
    that ended (with <end>) and captions cut off at the length limit (without) alike."""
    torch.manual_seed(0)
    decoder = build_decoder(DecoderConfig(model, 30, 12, 10, 14, 6, dropout=0.0))
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


def test_samples_of_an_image_share_its_features_and_differ():
    torch.manual_seed(0)
    decoder = build_decoder(DecoderConfig("show-attend-tell", 20, 8, 8, 8, 4)).eval()
    features = torch.randn(2, 4, 8)
    drawn = sample(decoder, features, DecodingConfig("sample", max_length=6, seed=1), 4)
    alone = sample(decoder, features[1:], DecodingConfig("sample", max_length=6, seed=1), 4)
    assert len(drawn) == 8 and len({tuple(c.tokens) for c in drawn}) > 2
    # the same draws, so rows 4..7 are image 1's whatever came before them in the batch
    assert len(alone) == 4
    for caption in drawn:
        assert caption.ended == (len(caption.tokens) < 6)


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
    start = cross_entropy_runs[model]
    config = TrainConfig(
        store,
        tmp_path / "scst",
        model=model,
        objective="scst",
        init=start,
        epochs=3,
        lr=3e-3,
        **OPTIONS,
    )
    result = train(config)
    rows = result.history
    assert result.selection_metric == "val_cider" and all("mean_reward" in row for row in rows)
    assert rows[-1]["mean_reward"] > rows[0]["mean_reward"]
    before, after = held_out_reward(start, store), held_out_reward(result.best_checkpoint, store)
    assert after > before * 1.05, (before, after)
    # it fine-tuned the start: same vocabulary and sizes, no dropout, its own options recorded
    checkpoint, _ = load_checkpoint(result.best_checkpoint)
    assert checkpoint.vocabulary.words == load_checkpoint(start)[0].vocabulary.words
    assert checkpoint.decoder_config.dropout == 0.0
    assert checkpoint.training["options"]["objective"] == "scst"
    assert checkpoint.training["options"]["lr"] == 3e-3


def test_greedy_baseline_and_exact_resume(store, cross_entropy_runs, tmp_path):
    common = dict(
        model="show-attend-tell",
        objective="scst",
        scst_baseline="greedy",
        init=cross_entropy_runs["show-attend-tell"],
        **OPTIONS,
    )
    whole = train(TrainConfig(store, tmp_path / "whole", epochs=2, **common))
    train(TrainConfig(store, tmp_path / "cut", epochs=1, **common))
    resumed = train(TrainConfig(store, tmp_path / "cut", epochs=2, resume=True, **common))
    timing = {"captions_per_s", "data_wait", "seconds"}
    strip = [{k: v for k, v in row.items() if k not in timing} for row in resumed.history]
    assert strip == [{k: v for k, v in row.items() if k not in timing} for row in whole.history]
    ours, theirs = (load_checkpoint(r.last_checkpoint)[0].state_dict for r in (resumed, whole))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)


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
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"mean_reward", "val_cider", "val_bleu4", "objective"} <= set(row)
    assert "train_loss" not in row
