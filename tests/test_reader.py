"""Reading ahead of the step: the threads change when the work is done, never what is trained;
maps held in a device's memory; the default reader threads; pinned batches; --preload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import make_store, without_timing

from captioner.checkpoint import load_checkpoint
from captioner.cli import main, train_commands
from captioner.errors import CaptionerError
from captioner.store import FeatureStore
from captioner.text import Vocabulary
from captioner.training import TrainConfig, train
from captioner.training import data as training_data
from captioner.training.batches import (
    PRELOAD_RESERVE_BYTES,
    FeatureStream,
    StreamConfig,
    check_fits,
    encode_captions,
)
from captioner.training.data import reader_threads

SMALL = dict(
    model="show-attend-tell", embed_size=8, hidden_size=8, attention_size=4, min_count=1,
    batch_size=6, lr=0.01, epochs=1, seed=2, device="cpu", native_attention=False,
)  # fmt: skip
GiB = 1 << 30


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("reader") / "store.zarr", images=24)


def stream_over(store: Path, **options) -> FeatureStream:
    opened = FeatureStore.open(store)
    corpus = opened.corpus()
    vocabulary = Vocabulary.build(corpus.tokens_of_split("train"), min_count=1)
    rows = opened.split_indices("train")
    captions = encode_captions(corpus, vocabulary, rows.tolist(), max_length=20)
    config = StreamConfig(kind="spatial", batch_size=6, window_shards=2, seed=4, **options)
    return FeatureStream(opened, rows, captions, config)


def contents(stream: FeatureStream, epoch: int, start: int = 0) -> list[tuple]:
    return [
        (b.rows.tolist(), b.features.tolist(), b.captions.tolist(), b.image_index.tolist())
        for b in stream.epoch(epoch, start)
    ]


def test_training_with_or_without_reading_ahead_ends_with_the_same_weights(
    store, tmp_path, one_thread, capsys
):
    runs = {}
    for workers, preload in ((0, "none"), (3, "none"), (2, "ram")):
        out = tmp_path / f"workers{workers}"
        config = TrainConfig(features=store, out=out, workers=workers, preload=preload, **SMALL)
        result = train(config, progress=True)
        runs[workers] = (without_timing(result.history), load_checkpoint(out / "last.pt")[0])
        said = capsys.readouterr().out.splitlines()
    assert runs[0][0] == runs[3][0]  # losses and validation metrics, epoch by epoch
    weights = [runs[w][1].state_dict for w in (0, 3)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    data = next(line for line in said[:4] if line.startswith("data: "))
    assert data == (  # the run's first lines say how the features reach the step
        "data: spatial features held in RAM (1.5 KB); 2 reader threads, 4 batches ahead (--workers)"
    )


def test_the_batches_are_the_same_at_any_depth_and_held_on_a_device_or_not(store):
    for held in ({}, dict(preload=True)):
        expected = contents(stream_over(store, workers=0, **held), 3)
        for options in (dict(workers=1, prefetch=1), dict(workers=3, prefetch=6)):
            stream = stream_over(store, **options, **held)
            assert contents(stream, 3) == expected, options
            assert contents(stream, 3, start=2) == expected[2:], options
    on_device = stream_over(store, preload=True, preload_device=torch.device("cpu"), workers=2)
    assert contents(on_device, 3) == expected  # the preloaded order, from a tensor
    maps = FeatureStore.open(store).read("spatial", on_device.rows)
    assert on_device.held_bytes == maps.nbytes > 0
    assert stream_over(store).held_bytes == 0


def test_preloading_refuses_maps_that_would_leave_training_short_of_gpu_memory():
    check_fits(4 * GiB, None, "s.zarr: --preload gpu")  # a device that does not say: no check
    check_fits(4 * GiB, (7 * GiB, 10 * GiB), "s.zarr: --preload gpu")  # 3 GiB stay free
    with pytest.raises(CaptionerError) as refused:
        check_fits(4 * GiB, (5 * GiB, 10 * GiB), "s.zarr: --preload gpu")
    assert str(refused.value).startswith("s.zarr: --preload gpu: the maps take 4.3 GB")
    assert "2.1 GB kept for training" in str(refused.value)
    big = 100 * GiB  # a tenth of a large GPU is kept, not just the 2 GiB
    with pytest.raises(CaptionerError, match="kept for training"):
        check_fits(big - PRELOAD_RESERVE_BYTES, (big, 10 * big), "s.zarr: --preload gpu")


def test_reader_threads_by_device_and_cpus(monkeypatch):
    monkeypatch.setattr(training_data, "available_cpus", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # the step leaves a CPU
    assert reader_threads(None, torch.device("cpu"))[0] == 1
    assert reader_threads(5, torch.device("cpu")) == (5, "--workers")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # the step holds every CPU
    threads, why = reader_threads(None, torch.device("cpu"))
    assert threads == 0 and "a reader would stall them" in why
    monkeypatch.setattr(training_data, "available_cpus", lambda: 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert reader_threads(None, torch.device("cpu"))[0] == 0
    monkeypatch.setattr(training_data, "default_workers", lambda most: min(most, 16))
    assert reader_threads(None, torch.device("cuda"))[0] == 4


def test_batches_for_a_gpu_are_pinned_whole(store, monkeypatch):
    pinned = []

    def pin(tensor):
        copy = tensor.clone()
        pinned.append(copy)
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    batch = next(iter(stream_over(store, pin_memory=True, workers=2).epoch(0)))
    parts = (batch.features, batch.image_index, batch.captions, batch.lengths)
    assert all(any(part is copy for copy in pinned) for part in parts)


def test_preload_gpu_is_refused_in_one_line_on_a_cpu(store, tmp_path, monkeypatch):
    given = []
    monkeypatch.setattr(train_commands, "train", lambda config, progress: given.append(config))
    CliRunner().invoke(main, ["train", "--features", str(store), "--out", "x", "--preload"])
    assert given[-1].preload == "ram"  # the bare flag keeps meaning RAM
    monkeypatch.undo()
    result = CliRunner().invoke(
        main,
        ["train", "--features", str(store), "--out", str(tmp_path), "--preload", "gpu"]
        + ["--device", "cpu"],
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: --preload gpu: training runs on cpu, not on a CUDA GPU; hold the maps in RAM"
        " with --preload ram"
    )
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_unknown_preload_is_refused():
    with pytest.raises(CaptionerError, match="preload"):
        train(TrainConfig(features=Path("s.zarr"), out=Path("r"), preload="disk"))
