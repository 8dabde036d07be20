"""The compiled attention scores (additive_scores.c) compute what PyTorch's ops compute, are built
once and cached, and give way to PyTorch's ops where they cannot be built."""

from __future__ import annotations

import pytest
import torch
from conftest import single_thread
from factories import make_store

from captioner import models
from captioner.models import DecoderConfig, build_decoder
from captioner.models import native_attention as native_module
from captioner.models.native_attention import load_native_scores, worth_compiling
from captioner.models.show_attend_tell import additive_scores
from captioner.training import TrainConfig, train


def torch_scores(projection, query, weight, bias):
    """The definition, in float64."""
    activation = torch.tanh(projection.double().unsqueeze(1) + query.double().unsqueeze(2))
    return activation @ weight.double() + bias.double()


def inputs(images: int, rows: int, regions: int, size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(images, regions, size, generator=generator)
    query = torch.randn(images, rows, size, generator=generator)
    weight = torch.randn(size, generator=generator) / size**0.5
    bias = torch.randn(1, generator=generator)
    return projection, query, weight, bias


@pytest.mark.parametrize(
    "images, rows, regions, size", [(3, 5, 7, 37), (1, 1, 196, 512), (4, 3, 2, 16)]
)
def test_scores_and_gradients_equal_the_definition(native_scores, images, rows, regions, size):
    projection, query, weight, bias = inputs(images, rows, regions, size)
    grad_scores = torch.randn(images, rows, regions, generator=torch.Generator().manual_seed(9))
    leaves = [t.double().requires_grad_() for t in (projection, query, weight)]
    expected = torch_scores(*leaves, bias)
    expected.backward(grad_scores.double())

    got = native_scores.forward(projection, query, weight, bias)
    grads = native_scores.backward(projection, query, weight, grad_scores)
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for grad, leaf in zip(grads, leaves, strict=True):
        scale = float(leaf.grad.abs().max())
        torch.testing.assert_close(grad.double(), leaf.grad, rtol=1e-5, atol=1e-5 * scale)


def test_autograd_through_additive_scores_matches_the_pytorch_ops(native_scores):
    """The same call with and without the library: values and the gradients of all four inputs,
    with a query that is a non-contiguous view, as the decoder passes it."""
    projection, query, weight, bias = inputs(2, 4, 9, 24, seed=1)
    stacked = torch.cat([query, torch.randn(2, 4, 5)], -1)
    results = []
    for native in (None, native_scores):
        leaves = [t.clone().requires_grad_() for t in (projection, stacked, weight, bias)]
        scores = additive_scores(leaves[0], leaves[1][..., :24], leaves[2], leaves[3], native)
        (scores * torch.linspace(-1, 1, scores.numel()).view_as(scores)).sum().backward()
        results.append((scores.detach(), [leaf.grad for leaf in leaves]))
    (torch_values, torch_grads), (native_values, native_grads) = results
    torch.testing.assert_close(native_values, torch_values, rtol=1e-5, atol=1e-6)
    for got, expected in zip(native_grads, torch_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # decoding: the forward alone
        values = additive_scores(projection, query, weight, bias, native_scores)
    torch.testing.assert_close(values, torch_values, rtol=1e-5, atol=1e-6)


def test_more_threads_than_cores_split_the_images_and_sum_the_weight_gradient(native_scores):
    """The images split over 4 threads (each with its own part of the weight's gradient), and
    over more threads than images, agree with the definition."""
    projection, query, weight, bias = inputs(6, 3, 11, 40, seed=2)
    grad_scores = torch.randn(6, 3, 11, generator=torch.Generator().manual_seed(3))
    leaves = [t.double().requires_grad_() for t in (projection, query, weight)]
    torch_scores(*leaves, bias).backward(grad_scores.double())
    threads = torch.get_num_threads()
    try:
        for count in (4, 9):
            torch.set_num_threads(count)
            grads = native_scores.backward(projection, query, weight, grad_scores)
            for grad, leaf in zip(grads, leaves, strict=True):
                torch.testing.assert_close(grad.double(), leaf.grad, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_tensors_of_mismatched_sizes_are_refused_before_the_library_reads_them(native_scores):
    projection, query, weight, bias = inputs(3, 2, 7, 32)
    with pytest.raises(ValueError, match="query"):
        native_scores.forward(projection, query[:2], weight, bias)
    with pytest.raises(ValueError, match="weight"):
        native_scores.forward(projection, query, weight[:16], bias)
    with pytest.raises(ValueError, match="grad_scores"):
        native_scores.backward(projection, query, weight, torch.zeros(3, 2, 6))


def test_nan_stays_in_its_image_and_results_repeat_bit_for_bit(native_scores):
    projection, query, weight, bias = inputs(3, 2, 5, 32)
    projection[1, 2, 7] = float("nan")
    scores = native_scores.forward(projection, query, weight, bias)
    assert scores[1, :, 2].isnan().all()
    assert not scores[[0, 2]].isnan().any() and scores[1, :, [0, 1, 3, 4]].isfinite().all()
    grad_scores = torch.ones(3, 2, 5)
    projection[1, 2, 7] = 0.0
    first = native_scores.backward(projection, query, weight, grad_scores)
    again = native_scores.backward(projection, query, weight, grad_scores)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    with single_thread():  # one thread: the weight's gradient is summed in another order
        one = native_scores.backward(projection, query, weight, grad_scores)
    for a, b in zip(first, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_only_float32_cpu_tensors_go_to_the_library(native_scores):
    projection, query, weight, bias = inputs(2, 2, 3, 8)
    assert native_scores.accepts(projection, query, weight)
    assert not native_scores.accepts(projection.double(), query.double(), weight.double())
    assert not native_scores.accepts(projection.bfloat16(), query, weight)


def test_built_once_per_cache_then_loaded(tmp_path):
    first, note = load_native_scores(tmp_path)
    if first is None:
        pytest.skip(f"compiled attention scores unavailable: {note}")
    assert note.startswith("compiled in ") and first.path.parent == tmp_path
    again, note = load_native_scores(tmp_path)
    assert note == f"cached in {first.path}" and again.path == first.path
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no scratch left behind


def test_without_a_working_compiler_the_reason_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    native, note = load_native_scores(tmp_path)
    assert native is None and note == "no C compiler (no-such-compiler) on PATH"
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    native, note = load_native_scores(tmp_path)
    assert native is None and note.startswith("false could not build additive_scores.c")
    assert not any(tmp_path.rglob("*.so"))


def test_only_attention_maps_large_enough_to_profit_compile():
    assert worth_compiling(196, 512) and worth_compiling(49, 512) and worth_compiling(64, 64)
    assert not worth_compiling(9, 16) and not worth_compiling(196, 8)


def test_training_loads_the_library_for_attention_on_a_cpu(tmp_path, monkeypatch, native_scores):
    monkeypatch.setattr(models, "worth_compiling", lambda regions, size: True)
    monkeypatch.setattr(models, "load_native_scores", lambda: (native_scores, "cached in X"))

    def decoder(model: str):
        return build_decoder(DecoderConfig(model, 10, 6, 4, 4, 4))

    attention = decoder("show-attend-tell")
    note = models.load_native_attention(attention, 9, torch.device("cpu"))
    assert note == "attention scores: the compiled loop, cached in X"
    assert attention.attention.native is native_scores
    assert models.load_native_attention(decoder("show-tell"), 9, torch.device("cpu")) == ""
    monkeypatch.setattr(models, "load_native_scores", lambda: (None, "no C compiler (cc) on PATH"))
    unavailable = decoder("show-attend-tell")
    note = models.load_native_attention(unavailable, 9, torch.device("cpu"))
    assert note == (
        "attention scores: PyTorch ops (the compiled loop is unavailable: no C compiler (cc) on"
        " PATH)"
    )
    assert unavailable.attention.native is None
    monkeypatch.setattr(models, "worth_compiling", native_module.worth_compiling)
    small = decoder("show-attend-tell")
    assert models.load_native_attention(small, 9, torch.device("cpu")) == ""


def test_a_training_run_says_which_scores_it_uses_and_resumes_with_the_other(
    tmp_path, monkeypatch, native_scores, capsys
):
    """train_decoder.py loads the compiled scores (forced here for a tiny model) and says so;
    --no-native-attention is a change a resumed run accepts, and then nothing is loaded."""
    monkeypatch.setattr(models, "worth_compiling", lambda regions, size: True)
    monkeypatch.setattr(models, "load_native_scores", lambda: (native_scores, "cached in X"))
    store = make_store(tmp_path / "store.zarr", images=12)
    options = dict(
        features=store, out=tmp_path / "run", model="show-attend-tell", embed_size=8,
        hidden_size=8, attention_size=4, min_count=1, batch_size=6, workers=0,
    )  # fmt: skip
    train(TrainConfig(epochs=1, **options), progress=True)
    assert "attention scores: the compiled loop, cached in X" in capsys.readouterr().out
    resumed = train(
        TrainConfig(epochs=2, resume=True, native_attention=False, **options), progress=True
    )
    assert len(resumed.history) == 2
    assert "attention scores" not in capsys.readouterr().out
