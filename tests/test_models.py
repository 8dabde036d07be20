"""The decoders learn, ignore padding, and decode step by step exactly as they were trained."""

import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from plain_decoders import PlainShowAttendTell, PlainShowTell, masked_label_smoothed_loss

from captioner.errors import CaptionerError
from captioner.models import DecoderConfig, LossOutput, base, build_decoder, show_attend_tell
from captioner.models.base import label_smoothed_loss, length_mask, select_rows
from captioner.models.decode import DecodingConfig, generate
from captioner.models.step_weights import LoopWeight
from captioner.text import END_ID, PAD_ID, START_ID

MODELS = ["show-tell", "show-attend-tell"]
VOCAB, CHANNELS, REGIONS = 14, 12, 6


def make_decoder(model: str, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    config = DecoderConfig(
        model, VOCAB, CHANNELS, embed_size=16, hidden_size=24, attention_size=10, dropout=dropout
    )
    return build_decoder(config)


def make_features(decoder, images: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (images, CHANNELS) if decoder.feature_kind == "pooled" else (images, REGIONS, CHANNELS)
    return torch.randn(shape, generator=generator)


def pad_captions(word_lists: list[list[int]], extra: int = 0, fill: int = PAD_ID):
    """<start> words <end>, padded to the longest (+ `extra` columns) with `fill`."""
    ids = [[START_ID, *words, END_ID] for words in word_lists]
    lengths = torch.tensor([len(row) for row in ids])
    captions = torch.full((len(ids), int(lengths.max()) + extra), fill, dtype=torch.long)
    for row, caption in enumerate(ids):
        captions[row, : len(caption)] = torch.tensor(caption)
    return captions, lengths


# Five captions of different lengths over three images (image 2 has three captions).
WORDS = [[4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 4, 5], [6], [7, 8, 9]]
IMAGE_INDEX = torch.tensor([0, 1, 2, 2, 2])


def greedy(decoder, features: torch.Tensor, max_length: int = 10) -> list[list[int]]:
    memory = decoder.encode(features)
    state = decoder.init_state(memory)
    tokens = torch.full((features.size(0),), START_ID)
    out = [[] for _ in range(features.size(0))]
    done = torch.zeros(features.size(0), dtype=torch.bool)
    for _ in range(max_length):
        log_probs, state, _ = decoder.step(tokens, state, memory)
        tokens = log_probs.argmax(-1)
        for row in range(len(out)):
            if not done[row] and tokens[row] != END_ID:
                out[row].append(int(tokens[row]))
        done |= tokens == END_ID
    return out


@pytest.mark.parametrize("model", MODELS)
def test_overfits_a_handful_of_captions(model):
    decoder = make_decoder(model)
    words = [[4, 5, 6, 7], [8, 9, 10], [11, 12, 4, 5, 13], [6, 9]]
    features = make_features(decoder, len(words))
    captions, lengths = pad_captions(words)
    index = torch.arange(len(words))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=0.02)
    first = None
    for _ in range(150):
        optimizer.zero_grad()
        output = decoder.training_loss(features, index, captions, lengths, alpha_c=0.1)
        output.loss.backward()
        optimizer.step()
        first = first if first is not None else output.loss.item()
    decoder.eval()
    with torch.no_grad():
        final = decoder.training_loss(features, index, captions, lengths)
    assert first > 2.0
    assert final.loss.item() < 0.02
    assert final.tokens == int((lengths - 1).sum())
    assert greedy(decoder, features) == words  # learned through the training path, decoded by steps


@pytest.mark.parametrize("model", MODELS)
def test_padding_is_ignored(model):
    decoder = make_decoder(model)
    features = make_features(decoder, 3)
    captions, lengths = pad_captions(WORDS)
    longer, _ = pad_captions(WORDS, extra=4)
    garbage, _ = pad_captions(WORDS, extra=2, fill=9)  # non-pad ids after each caption's end
    losses = [
        decoder.training_loss(features, IMAGE_INDEX, c, lengths, label_smoothing=0.1, alpha_c=1.0)
        for c in (captions, longer, garbage)
    ]
    for other in losses[1:]:
        assert other.tokens == losses[0].tokens
        torch.testing.assert_close(other.loss, losses[0].loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(other.nll_sum, losses[0].nll_sum, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_loss_equals_torch_cross_entropy_with_ignore_index(model):
    """Both the packed (show-tell) and the masked (attention) loss equal PyTorch's own
    label-smoothed cross entropy over the same log-probs with padding ignored."""
    decoder = make_decoder(model)
    features = make_features(decoder, 3)
    captions, lengths = pad_captions(WORDS)
    output = decoder.training_loss(features, IMAGE_INDEX, captions, lengths, label_smoothing=0.1)
    log_probs = decoder.teacher_forced_log_probs(features, IMAGE_INDEX, captions, lengths)
    targets = captions[:, 1:]
    reference = F.cross_entropy(
        log_probs.transpose(1, 2), targets, ignore_index=PAD_ID, label_smoothing=0.1
    )
    nll = F.cross_entropy(log_probs.transpose(1, 2), targets, ignore_index=PAD_ID, reduction="sum")
    torch.testing.assert_close(output.loss, reference)
    torch.testing.assert_close(output.nll_sum, nll)


def test_show_tell_packed_loss_equals_masked_full_length_loss():
    decoder = make_decoder("show-tell")
    features = make_features(decoder, 3)
    captions, lengths = pad_captions(WORDS, extra=3)
    packed = decoder.training_loss(features, IMAGE_INDEX, captions, lengths, label_smoothing=0.2)
    log_probs = decoder.teacher_forced_log_probs(features, IMAGE_INDEX, captions, lengths)
    steps = log_probs.size(1)
    masked = masked_label_smoothed_loss(
        log_probs, captions[:, 1 : steps + 1], 0.2, length_mask(lengths - 1, steps)
    )
    assert packed.tokens == masked.tokens == int((lengths - 1).sum())
    torch.testing.assert_close(packed.loss, masked.loss)
    torch.testing.assert_close(packed.nll_sum, masked.nll_sum)


@pytest.mark.parametrize("model", MODELS)
def test_step_api_gives_the_teacher_forced_log_probs(model):
    decoder = make_decoder(model, dropout=0.5).eval()  # eval: dropout must be off in both paths
    features = make_features(decoder, 3)
    captions, lengths = pad_captions(WORDS)
    with torch.no_grad():
        teacher = decoder.teacher_forced_log_probs(features, IMAGE_INDEX, captions, lengths)
        memory = select_rows(decoder.encode(features), IMAGE_INDEX)
        state = decoder.init_state(memory)
        for t in range(teacher.size(1)):
            log_probs, state, alpha = decoder.step(captions[:, t], state, memory)
            assert log_probs.dtype == torch.float32
            real = t < lengths - 1
            torch.testing.assert_close(log_probs[real], teacher[real, t], rtol=0, atol=1e-5)
            if decoder.feature_kind == "spatial":
                assert alpha.shape == (len(WORDS), REGIONS)
                torch.testing.assert_close(alpha.sum(1), torch.ones(len(WORDS)))
            else:
                assert alpha is None


@pytest.mark.parametrize("model", MODELS)
def test_state_and_memory_reorder_along_dim_0(model):
    """Beam search reorders state and memory with index_select(0, ...): rows must move intact."""
    decoder = make_decoder(model).eval()
    features = make_features(decoder, 3)
    tokens = torch.tensor([4, 5, 6])
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        memory = decoder.encode(features)
        state = decoder.init_state(memory)
        log_probs, _, _ = decoder.step(tokens, state, memory)
        reordered, _, _ = decoder.step(
            tokens[order], select_rows(state, order), select_rows(memory, order)
        )
    torch.testing.assert_close(reordered, log_probs[order])


@pytest.mark.parametrize("model", MODELS)
def test_sharing_image_memory_equals_repeating_the_image(model):
    decoder = make_decoder(model, dropout=0.0)
    features = make_features(decoder, 3)
    captions, lengths = pad_captions(WORDS)
    shared = decoder.training_loss(features, IMAGE_INDEX, captions, lengths, 0.1, alpha_c=1.0)
    shared.loss.backward()
    shared_grads = [p.grad.clone() for p in decoder.parameters()]
    decoder.zero_grad()
    repeated = decoder.training_loss(
        features[IMAGE_INDEX], torch.arange(len(WORDS)), captions, lengths, 0.1, alpha_c=1.0
    )
    repeated.loss.backward()
    torch.testing.assert_close(shared.loss, repeated.loss)
    for a, p in zip(shared_grads, decoder.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_attention_projection_is_computed_once_per_image():
    decoder = make_decoder("show-attend-tell")
    calls = []
    decoder.attention.feature_projection.register_forward_hook(
        lambda module, inputs, output: calls.append(tuple(inputs[0].shape))
    )
    captions, lengths = pad_captions(WORDS)
    decoder.training_loss(make_features(decoder, 3), IMAGE_INDEX, captions, lengths)
    assert calls == [(3, REGIONS, CHANNELS)]  # one call, per image, not per caption or per step


def test_attention_penalty_counts_only_real_steps():
    decoder = make_decoder("show-attend-tell").eval()
    features = make_features(decoder, 3)
    captions, lengths = pad_captions(WORDS, extra=2)
    with torch.no_grad():
        plain = decoder.training_loss(features, IMAGE_INDEX, captions, lengths, alpha_c=0.0)
        penalised = decoder.training_loss(features, IMAGE_INDEX, captions, lengths, alpha_c=0.7)
        memory = select_rows(decoder.encode(features), IMAGE_INDEX)
        state = decoder.init_state(memory)
        attention_sum = torch.zeros(len(WORDS), REGIONS)
        for t in range(int(lengths.max()) - 1):
            _, state, alpha = decoder.step(captions[:, t], state, memory)
            attention_sum += alpha * (t < lengths - 1).unsqueeze(1)
    expected = 0.7 * ((1 - attention_sum) ** 2).mean()
    torch.testing.assert_close(penalised.loss - plain.loss, expected)


def test_config_round_trip_and_bad_names():
    config = DecoderConfig("show-attend-tell", 100, 2048, dropout=0.3)
    assert DecoderConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown decoder config keys"):
        DecoderConfig.from_dict({**config.to_dict(), "layers": 2})
    with pytest.raises(CaptionerError, match="unknown model 'show-and-tell'"):
        build_decoder(DecoderConfig("show-and-tell", 10, 4))


def test_loss_output_fields():
    decoder = make_decoder("show-tell")
    captions, lengths = pad_captions(WORDS)
    output = decoder.training_loss(make_features(decoder, 3), IMAGE_INDEX, captions, lengths)
    assert isinstance(output, LossOutput)
    assert output.loss.requires_grad and output.loss.dim() == 0
    assert isinstance(output.tokens, int)


@pytest.mark.parametrize("model", MODELS)
def test_feature_statistics_standardize_what_the_decoder_reads(model):
    """A decoder with statistics (mean, std) reads x as one without them reads (x - mean) / std,
    in training and in decoding alike, and keeps them in its weights."""
    plain, standardizing = make_decoder(model).eval(), make_decoder(model).eval()
    mean, std = torch.linspace(-3, 3, CHANNELS), torch.linspace(0.5, 40, CHANNELS)
    standardizing.set_feature_statistics(mean, std)
    features = make_features(plain, 3) * std + mean
    captions, lengths = pad_captions(WORDS)
    torch.testing.assert_close(
        standardizing.training_loss(features, IMAGE_INDEX, captions, lengths).loss,
        plain.training_loss((features - mean) / std, IMAGE_INDEX, captions, lengths).loss,
    )
    assert greedy(standardizing, features) == greedy(plain, (features - mean) / std)
    reloaded = make_decoder(model)
    reloaded.load_state_dict(standardizing.state_dict())
    torch.testing.assert_close(reloaded.feature_std, std)


# ---- the fast attention step against the plain one (tests/plain_decoders.py) ----------------


def fast_and_plain(seed: int = 0, **sizes):
    """The attention model and its plain layer-by-layer version, with the same weights."""
    torch.manual_seed(seed)
    config = DecoderConfig(
        "show-attend-tell",
        40,
        20,
        **{"embed_size": 12, "hidden_size": 16, "attention_size": 18, "dropout": 0.0, **sizes},
    )
    fast = build_decoder(config)
    plain = PlainShowAttendTell(config)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


@pytest.mark.parametrize(
    "image_index",
    [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]],
    ids=["same-captions-per-image", "ragged"],
)
@pytest.mark.parametrize(
    "scores", ["one-chunk", "chunk-per-image", "native"], ids=lambda scores: f"scores-{scores}"
)
def test_fast_attention_loss_and_every_gradient_equal_the_plain_model(
    image_index, scores, monkeypatch, request
):
    """Random batches through the fast step (stacked products, weight gradients once per loop,
    shared image memory, chunked or compiled attention scores, head on real tokens) and the plain
    one agree in float32 to a relative 1e-5 in the loss and in every parameter's gradient."""
    monkeypatch.setattr(
        show_attend_tell, "_SCORE_CHUNK_VALUES", 1 if scores == "chunk-per-image" else 1 << 19
    )
    fast, plain = fast_and_plain()
    if scores == "native":
        fast.attention.native = request.getfixturevalue("native_scores")
    generator = torch.Generator().manual_seed(3)
    for trial in range(3):
        features = torch.randn(4, 9, 20, generator=generator).relu() * 3
        lengths = torch.randint(3, 12, (len(image_index),), generator=generator)
        captions = torch.randint(4, 40, (len(image_index), int(lengths.max())), generator=generator)
        index = torch.tensor(image_index)
        outputs = []
        for decoder in (fast, plain):
            decoder.zero_grad()
            output = decoder.training_loss(features, index, captions, lengths, 0.1, alpha_c=1.0)
            output.loss.backward()
            outputs.append(output)
        torch.testing.assert_close(outputs[0].loss, outputs[1].loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(outputs[0].nll_sum, outputs[1].nll_sum, rtol=1e-5, atol=0)
        assert outputs[0].tokens == outputs[1].tokens == int((lengths - 1).sum())
        for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
            if name == "attention.score.bias":  # softmax ignores it: zero up to rounding in both
                assert float(a.grad.abs().max()) < 1e-6 and float(b.grad.abs().max()) < 1e-6
                continue
            scale = float(b.grad.abs().max())
            assert scale > 0, name
            torch.testing.assert_close(
                a.grad, b.grad, rtol=1e-5, atol=1e-5 * scale, msg=f"{name}, trial {trial}"
            )


@pytest.mark.parametrize("scores", ["torch", "native"])
def test_fast_attention_decodes_the_plain_models_captions(scores, request):
    fast, plain = fast_and_plain(hidden_size=24)
    if scores == "native":
        fast.attention.native = request.getfixturevalue("native_scores")
    with torch.no_grad():
        fast.head[1].weight.mul_(5.0)  # peaked, and the end token's odds vary with the state,
        fast.head[1].weight[END_ID].mul_(10.0)  # so captions end at different lengths
        fast.head[1].bias[END_ID] -= 1.0
        plain.load_state_dict(fast.state_dict())
    features = torch.randn(6, 9, 20, generator=torch.Generator().manual_seed(4))
    fast.eval(), plain.eval()
    for config in (DecodingConfig(beam_size=3, max_length=12), DecodingConfig("greedy")):
        got, expected = generate(fast, features, config), generate(plain, features, config)
        assert [c.tokens for c in got] == [c.tokens for c in expected]
        assert len({len(c.tokens) for c in got}) > 1
        for a, b in zip(got, expected, strict=True):
            assert a.log_prob == pytest.approx(b.log_prob, rel=1e-5, abs=1e-5)
            if a.tokens:  # (an empty caption has no attention to compare)
                np.testing.assert_allclose(a.attention, b.attention, rtol=1e-5, atol=1e-6)


def assert_same_gradients(fast: torch.nn.Module, plain: torch.nn.Module, message: str) -> None:
    """Every parameter's gradient agrees to a relative 1e-5 of its largest value."""
    for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        scale = float(b.grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(
            a.grad, b.grad, rtol=1e-5, atol=1e-5 * scale, msg=f"{name}, {message}"
        )


def test_fast_show_tell_loss_and_every_gradient_equal_nn_lstm_over_the_packed_batch():
    """Show-and-Tell's written-out LSTM over the packed batch, its fused loss and its decoding
    steps agree with nn.LSTM and autograd's loss (tests/plain_decoders.PlainShowTell)."""
    torch.manual_seed(0)
    config = DecoderConfig("show-tell", 40, 20, embed_size=12, hidden_size=16, dropout=0.0)
    fast, plain = build_decoder(config), PlainShowTell(config)
    plain.load_state_dict(fast.state_dict())
    generator = torch.Generator().manual_seed(3)
    for trial in range(3):
        features = torch.randn(4, 20, generator=generator).relu() * 3
        index = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
        lengths = torch.randint(2, 12, (len(index),), generator=generator)
        captions = torch.randint(4, 40, (len(index), int(lengths.max())), generator=generator)
        outputs = []
        for decoder in (fast, plain):
            decoder.zero_grad()
            output = decoder.training_loss(features, index, captions, lengths, 0.1)
            output.loss.backward()
            outputs.append(output)
        torch.testing.assert_close(outputs[0].loss, outputs[1].loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(outputs[0].nll_sum, outputs[1].nll_sum, rtol=1e-5, atol=0)
        assert outputs[0].tokens == outputs[1].tokens == int((lengths - 1).sum())
        assert_same_gradients(fast, plain, f"trial {trial}")
    fast.eval(), plain.eval()
    for decoding in (DecodingConfig(beam_size=3, max_length=12), DecodingConfig("greedy")):
        got, expected = generate(fast, features, decoding), generate(plain, features, decoding)
        assert [c.tokens for c in got] == [c.tokens for c in expected]
        for a, b in zip(got, expected, strict=True):
            assert a.log_prob == pytest.approx(b.log_prob, rel=1e-5, abs=1e-5)


def test_label_smoothed_loss_and_its_gradient_equal_torch_cross_entropy():
    generator = torch.Generator().manual_seed(6)
    logits = (torch.randn(7, 11, generator=generator) * 3).requires_grad_()
    targets = torch.randint(0, 11, (7,), generator=generator)
    weights = torch.rand(7, generator=generator)  # a gradient that differs per token
    output = label_smoothed_loss(logits, targets, 0.2)
    (grad,) = torch.autograd.grad(output.loss * 7, logits, retain_graph=True)
    reference = F.cross_entropy(logits, targets, label_smoothing=0.2)
    (expected,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(output.loss, reference)
    torch.testing.assert_close(grad / 7, expected)
    torch.testing.assert_close(output.nll_sum, F.cross_entropy(logits, targets, reduction="sum"))
    smoothed, _ = base._SmoothedCrossEntropy.apply(logits, targets, 0.2)
    (grad,) = torch.autograd.grad((smoothed * weights).sum(), logits)
    per_token = F.cross_entropy(logits, targets, label_smoothing=0.2, reduction="none")
    (expected,) = torch.autograd.grad((per_token * weights).sum(), logits)
    torch.testing.assert_close(grad, expected)
    smoothed, _ = base._SmoothedCrossEntropy.apply(logits, targets, 0.2)
    (grad,) = torch.autograd.grad(smoothed.square().sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError):  # an error, not a silently wrong second derivative
        torch.autograd.grad(grad.sum(), logits)


def test_dropout_keeps_each_value_with_probability_1_minus_p_scaled_up():
    dropout = base.Dropout(0.3)
    inputs = torch.randn(400, 500, requires_grad=True)
    torch.manual_seed(0)
    outputs = dropout(inputs)
    kept = outputs != 0
    assert abs(float(kept.float().mean()) - 0.7) < 0.005
    torch.testing.assert_close(outputs[kept], inputs[kept] / 0.7)
    outputs.sum().backward()
    torch.testing.assert_close(inputs.grad, kept.float() / 0.7)
    torch.manual_seed(0)
    assert torch.equal(dropout(inputs), outputs)  # the seed decides the mask
    dropout.eval()
    assert torch.equal(dropout(inputs), inputs)


def test_loop_weight_equals_linear_in_values_and_gradients():
    """Gradients taken once per loop equal autograd's per-step ones, also when a step's output
    does not reach the loss; without autograd each weight is applied on its own."""
    generator = torch.Generator().manual_seed(5)
    parts = [torch.randn(n, 6, generator=generator, requires_grad=True) for n in (4, 8)]
    start = torch.randn(3, 6, generator=generator, requires_grad=True)

    def run(product):
        h, outputs = start, []
        for step in range(4):
            out = product(h)
            outputs.append(out)
            h = torch.tanh(out[:, :6]) + 0.1 * step
        loss = sum(o.square().sum() for o in outputs[:-1]) + h.sum()  # last out: only via h
        loss.backward()
        return loss.detach(), [t.grad.clone() for t in (*parts, start)]

    loop = LoopWeight(*parts)
    assert loop.deferred
    got = run(loop)
    for tensor in (*parts, start):
        tensor.grad = None
    expected = run(lambda x: F.linear(x, torch.cat(parts)))
    torch.testing.assert_close(got[0], expected[0])
    for a, b in zip(got[1], expected[1], strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        x = torch.randn(3, 6, generator=generator)
        plain_loop = LoopWeight(*parts)
        assert not plain_loop.deferred
        torch.testing.assert_close(plain_loop(x), F.linear(x, torch.cat(parts)))


def test_loop_weight_is_freed_without_the_cycle_collector():
    """The autograd graph must not point back at the LoopWeight whose weight it made: a
    reference cycle would keep each step's stacked weights alive until a full collection."""
    weight = torch.randn(4, 3, requires_grad=True)
    gc.disable()
    try:
        loop = LoopWeight(weight)
        loop(torch.randn(2, 3)).sum().backward()
        freed = weakref.ref(loop)
        del loop
        assert freed() is None
    finally:
        gc.enable()
