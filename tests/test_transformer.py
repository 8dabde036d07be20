"""The transformer decoder against its plain `nn.MultiheadAttention` version
(tests/plain_decoders.PlainTransformer): the same loss, gradients and captions; its cached steps
against its own one-pass teacher forcing; its configuration and the inputs it refuses."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from plain_decoders import PlainTransformer, plain_transformer_weights

from captioner.errors import CaptionerError
from captioner.models import DecoderConfig, TransformerDecoder, build_decoder
from captioner.models.base import select_rows
from captioner.models.decode import DecodingConfig, beam_search, generate, greedy_decode, sample
from captioner.text import END_ID, PAD_ID, START_ID

# Sizes this small compute fastest on one thread, and the same on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, CHANNELS, SIDE, WIDTH, HEADS = 30, 16, 3, 32, 2
REGIONS = SIDE * SIDE


def make_config(**sizes) -> DecoderConfig:
    defaults = {
        "embed_size": WIDTH,
        "hidden_size": WIDTH,
        "dropout": 0.0,
        "decoder_layers": 2,
        "heads": HEADS,
        "ff_size": 48,
        "max_positions": 24,
        "max_grid_side": 4,
    }
    return DecoderConfig("transformer", VOCAB, CHANNELS, **{**defaults, **sizes})


def make_decoder(seed: int = 0, **sizes) -> TransformerDecoder:
    torch.manual_seed(seed)
    return build_decoder(make_config(**sizes))


def make_features(images: int, seed: int = 1, regions: int = REGIONS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(images, regions, CHANNELS, generator=generator).relu() * 3


def fast_and_plain(seed: int = 0, **sizes) -> tuple[TransformerDecoder, PlainTransformer]:
    """The transformer and its plain version, with the same weights."""
    fast = make_decoder(seed, **sizes)
    plain = PlainTransformer(fast.config)
    plain.load_state_dict(plain_transformer_weights(fast.state_dict()))
    return fast, plain


def random_captions(
    captions: int, generator: torch.Generator, fill: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions of 3 to 11 tokens with <start> and <end>, and their lengths; after the end,
    random non-pad ids (or `fill`)."""
    lengths = torch.randint(3, 12, (captions,), generator=generator)
    ids = torch.randint(4, VOCAB, (captions, int(lengths.max()) + 2), generator=generator)
    ids[:, 0] = START_ID
    ids[torch.arange(captions), lengths - 1] = END_ID
    if fill is not None:
        ids[torch.arange(ids.size(1)) >= lengths.unsqueeze(1)] = fill
    return ids, lengths


def pad_captions(word_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [[START_ID, *words, END_ID] for words in word_lists]
    lengths = torch.tensor([len(row) for row in ids])
    captions = torch.full((len(ids), int(lengths.max())), PAD_ID)
    for row, caption in enumerate(ids):
        captions[row, : len(caption)] = torch.tensor(caption)
    return captions, lengths


# ---- the fast model against the plain one ---------------------------------------------------


@pytest.mark.parametrize("encoder_layers", [0, 1], ids=lambda n: f"encoder-layers-{n}")
@pytest.mark.parametrize(
    "image_index",
    [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]],
    ids=["same-captions-per-image", "ragged"],
)
def test_loss_and_every_gradient_equal_the_plain_model(image_index, encoder_layers):
    """One pass under the causal mask, the image's keys and values shared by its captions (or
    selected per caption where the numbers differ), the head on real tokens only: the loss and
    every parameter's gradient agree with the plain layers in float32 to a relative 1e-5."""
    fast, plain = fast_and_plain(encoder_layers=encoder_layers)
    generator = torch.Generator().manual_seed(3)
    index = torch.tensor(image_index)
    for trial in range(2):
        features = make_features(4, seed=trial)
        captions, lengths = random_captions(len(index), generator)
        outputs = []
        for decoder in (fast, plain):
            decoder.zero_grad()
            output = decoder.training_loss(features, index, captions, lengths, label_smoothing=0.1)
            output.loss.backward()
            outputs.append(output)
        torch.testing.assert_close(outputs[0].loss, outputs[1].loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(outputs[0].nll_sum, outputs[1].nll_sum, rtol=1e-5, atol=0)
        assert outputs[0].tokens == outputs[1].tokens == int((lengths - 1).sum())
        fast_grads = plain_transformer_weights({n: p.grad for n, p in fast.named_parameters()})
        plain_grads = {name: p.grad for name, p in plain.named_parameters()}
        assert fast_grads.keys() == plain_grads.keys()
        for name, expected in plain_grads.items():
            scale = float(expected.abs().max())
            assert scale > 0, name
            torch.testing.assert_close(
                fast_grads[name], expected, rtol=1e-5, atol=1e-5 * scale, msg=f"{name}, {trial}"
            )


def test_decodes_the_plain_models_captions():
    """Greedy decoding and beam search (which reorders the cache rows and drops finished
    images' rows) give the plain model's captions, log-probabilities and attention maps."""
    fast, plain = fast_and_plain(encoder_layers=1)
    with torch.no_grad():
        fast.head[1].weight.mul_(5.0)  # peaked, and the end token's odds vary with the state,
        fast.head[1].weight[END_ID].mul_(4.0)  # so captions end at different lengths
        plain.load_state_dict(plain_transformer_weights(fast.state_dict()))
    features = make_features(6, seed=4)
    fast.eval(), plain.eval()
    for config in (DecodingConfig(beam_size=3, max_length=12), DecodingConfig("greedy")):
        got, expected = generate(fast, features, config), generate(plain, features, config)
        assert [c.tokens for c in got] == [c.tokens for c in expected]
        assert len({len(c.tokens) for c in got}) > 1
        for a, b in zip(got, expected, strict=True):
            assert a.log_prob == pytest.approx(b.log_prob, rel=1e-5, abs=1e-5)
            if not a.tokens:  # (an empty caption has no attention to compare)
                continue
            assert a.attention.shape == (len(a.tokens), REGIONS)
            np.testing.assert_allclose(a.attention, b.attention, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a.attention.sum(1), 1.0, rtol=1e-5)


# ---- decoding through the step API ----------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["memory-per-caption", "memory-per-image"])
def test_cached_steps_give_the_teacher_forced_log_probs(shared):
    """Step by step from an empty cache, each step computing one position, the log-probs are
    those of the one-pass teacher forcing at every real position, whether each caption has its
    own memory row or an image's two captions share one."""
    decoder = make_decoder(dropout=0.5, encoder_layers=1).eval()  # eval: no dropout in either
    features = make_features(3)
    index = torch.tensor([0, 0, 1, 1, 2, 2] if shared else [2, 0, 1, 1, 2, 0])
    captions, lengths = random_captions(len(index), torch.Generator().manual_seed(5))
    with torch.no_grad():
        teacher = decoder.teacher_forced_log_probs(features, index, captions, lengths)
        memory = decoder.encode(features)
        state = decoder.init_state(memory)
        if shared:
            state = tuple(cache.repeat_interleave(2, 0) for cache in state)
        else:
            memory, state = select_rows(memory, index), select_rows(state, index)
        for t in range(teacher.size(1)):
            log_probs, state, alpha = decoder.step(captions[:, t], state, memory)
            real = t < lengths - 1
            torch.testing.assert_close(log_probs[real], teacher[real, t], rtol=0, atol=1e-5)
            assert alpha.shape == (len(index), REGIONS)
            torch.testing.assert_close(alpha.sum(1), torch.ones(len(index)))
            assert [cache.shape for cache in state] == [(len(index), t + 1, 2 * WIDTH)] * 2


def test_beam_size_one_is_greedy_and_batched_beam_is_per_image():
    decoder = make_decoder().eval()
    with torch.no_grad():
        decoder.head[1].weight.mul_(5.0)  # a random head is nearly uniform; make it opinionated
    features = make_features(5, seed=2)
    greedy = greedy_decode(decoder, features, max_length=10)
    beam_one = beam_search(decoder, features, DecodingConfig(beam_size=1, max_length=10))
    assert [c.tokens for c in beam_one] == [c.tokens for c in greedy]
    assert [c.log_prob for c in beam_one] == pytest.approx([c.log_prob for c in greedy], abs=1e-5)
    config = DecodingConfig(beam_size=3, max_length=10)
    batched = beam_search(decoder, features, config)
    single = [beam_search(decoder, features[i : i + 1], config)[0] for i in range(5)]
    assert [c.tokens for c in batched] == [c.tokens for c in single]
    assert [c.log_prob for c in batched] == pytest.approx([c.log_prob for c in single], abs=1e-5)


def test_sampling_is_seeded_and_an_images_samples_share_its_memory():
    """k samples per image (k cache rows per memory row) are repeatable with a seed and are the
    samples of the image repeated k times, memory and all."""
    decoder = make_decoder().eval()
    features = make_features(3, seed=6)
    config = DecodingConfig("sample", max_length=8, seed=5)
    shared = sample(decoder, features, config, samples_per_image=3)
    again = sample(decoder, features, config, samples_per_image=3)
    repeated = sample(decoder, features.repeat_interleave(3, 0), config)
    other_seed = sample(decoder, features, DecodingConfig("sample", max_length=8, seed=6), 3)
    assert len(shared) == 9
    assert [c.tokens for c in again] == [c.tokens for c in shared]
    assert [c.tokens for c in repeated] == [c.tokens for c in shared]
    assert [c.log_prob for c in repeated] == pytest.approx([c.log_prob for c in shared], abs=1e-5)
    assert [c.tokens for c in other_seed] != [c.tokens for c in shared]
    for caption in shared:
        assert caption.attention.shape == (len(caption.tokens), REGIONS)


# ---- training ---------------------------------------------------------------------------------


def test_learns_a_handful_of_captions_and_decodes_them_step_by_step():
    decoder = make_decoder()
    words = [[4, 5, 6, 7], [8, 9, 10], [11, 12, 4, 5, 13], [6, 9]]
    features = make_features(len(words))
    captions, lengths = pad_captions(words)
    index = torch.arange(len(words))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        decoder.training_loss(features, index, captions, lengths).loss.backward()
        optimizer.step()
    decoder.eval()
    with torch.no_grad():
        final = decoder.training_loss(features, index, captions, lengths)
    assert final.loss.item() < 0.05
    assert [c.tokens for c in greedy_decode(decoder, features)] == words


def test_padding_and_whatever_follows_the_end_are_ignored():
    decoder = make_decoder()
    features, index = make_features(3), torch.tensor([0, 1, 1, 2, 2])
    losses = []
    for fill in (PAD_ID, None):  # pads, or random words after each caption's end
        captions, lengths = random_captions(5, torch.Generator().manual_seed(7), fill)
        losses.append(decoder.training_loss(features, index, captions, lengths, 0.1))
    torch.testing.assert_close(losses[0].loss, losses[1].loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(losses[0].nll_sum, losses[1].nll_sum, rtol=0, atol=1e-5)


def test_cross_attention_keys_and_values_are_computed_once_per_image():
    decoder = make_decoder()
    calls = []
    for layer in decoder.layers:
        layer.cross_attention.key_value.register_forward_hook(
            lambda module, inputs, output: calls.append(tuple(inputs[0].shape))
        )
    captions, lengths = random_captions(5, torch.Generator().manual_seed(8))
    decoder.training_loss(make_features(3), torch.tensor([0, 1, 1, 2, 2]), captions, lengths)
    assert calls == [(3, REGIONS, WIDTH)] * 2  # per layer and image, not per caption or step


def test_trains_and_decodes_under_autocast():
    """Under bfloat16 autocast (a CPU's; a GPU's float16 and bfloat16 take the same paths) the
    loss is near float32's, the gradients are float32 and finite, and decoding runs."""
    decoder = make_decoder()
    features, index = make_features(3), torch.tensor([0, 0, 1, 1, 2, 2])
    captions, lengths = random_captions(6, torch.Generator().manual_seed(9))
    reference = decoder.training_loss(features, index, captions, lengths).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = decoder.training_loss(features, index, captions, lengths)
    output.loss.backward()
    assert output.loss.item() == pytest.approx(reference.item(), rel=0.02)
    for name, parameter in decoder.named_parameters():
        assert parameter.grad.dtype == torch.float32, name
        assert bool(parameter.grad.isfinite().all()), name
    decoder.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        beams = generate(decoder, features, DecodingConfig(beam_size=2, max_length=6))
    for caption in beams:
        np.testing.assert_allclose(caption.attention.sum(1), 1.0, atol=0.02)


# ---- configuration --------------------------------------------------------------------------


def test_config_round_trips_and_the_weights_load_as_plain_tensors():
    decoder = make_decoder(encoder_layers=1).eval()
    buffer = io.BytesIO()
    torch.save({"config": decoder.config.to_dict(), "state": decoder.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    config = DecoderConfig.from_dict(saved["config"])
    assert config == decoder.config
    reloaded = build_decoder(config).eval()
    reloaded.load_state_dict(saved["state"])
    features = make_features(2)
    assert [c.tokens for c in greedy_decode(reloaded, features)] == [
        c.tokens for c in greedy_decode(decoder, features)
    ]


def test_configs_saved_before_the_transformer_load_with_its_defaults():
    old = {
        "model": "show-attend-tell",
        "vocab_size": 100,
        "feature_size": 64,
        "embed_size": 32,
        "hidden_size": 48,
        "attention_size": 16,
        "dropout": 0.5,
    }
    config = DecoderConfig.from_dict(old)
    assert (config.decoder_layers, config.heads, config.ff_size, config.encoder_layers) == (
        3,
        8,
        2048,
        0,
    )
    assert (config.max_positions, config.max_grid_side) == (64, 32)
    build_decoder(config)


@pytest.mark.parametrize(
    "sizes, rules",
    [
        ({"heads": 3}, r"hidden_size divisible by heads \(got 32 and 3\)$"),
        ({"embed_size": 16}, r"embed_size == hidden_size \(d_model; got 16 and 32\)$"),
        ({"heads": 0, "decoder_layers": 0}, "heads >= 1, hidden_size .*, decoder_layers >= 1$"),
        ({"encoder_layers": -1}, "encoder_layers >= 0$"),
    ],
    ids=["heads-not-dividing-d-model", "embed-size-not-d-model", "three-at-once", "negative"],
)
def test_bad_sizes_are_refused_in_one_line(sizes, rules):
    with pytest.raises(ValueError, match=f"^transformer sizes must satisfy {rules}") as error:
        make_decoder(**sizes)
    assert "\n" not in str(error.value)


def test_grids_and_lengths_it_has_no_positions_for_are_refused():
    decoder = make_decoder().eval()
    captions, lengths = pad_captions([[4, 5]])
    index = torch.tensor([0])
    with pytest.raises(ValueError, match="square grid of regions, not 8"):
        decoder.training_loss(make_features(1, regions=8), index, captions, lengths)
    with pytest.raises(ValueError, match="5x5 grid exceeds the transformer's max_grid_side of 4"):
        decoder.encode(make_features(1, regions=25))
    long_captions, long_lengths = pad_captions([[4] * 24])  # 25 inputs: <start> and 24 words
    with pytest.raises(ValueError, match=r"max_positions=24 positions \(.*\), not 25"):
        decoder.training_loss(make_features(1), index, long_captions, long_lengths)
    with pytest.raises(ValueError, match="max_positions=24"):  # decoding a 25th word
        greedy_decode(decoder, make_features(1), max_length=25, min_length=25)
    (longest,) = greedy_decode(decoder, make_features(1), max_length=24, min_length=24)
    assert len(longest.tokens) == 24
    # evaluate and caption ask for at most the words a reference caption could have
    with pytest.raises(CaptionerError, match="^--max-length 24: this transformer decoder has"):
        generate(decoder, make_features(1), DecodingConfig(max_length=24))
    assert len(generate(decoder, make_features(1), DecodingConfig(max_length=23))) == 1
