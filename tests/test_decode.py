"""Decoding strategies against a small seeded decoder that implements the step API."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from captioner.errors import CaptionerError
from captioner.models.decode import DecodingConfig, beam_search, generate, greedy_decode, sample
from captioner.text import END_ID, START_ID


class FakeAttentionDecoder(nn.Module):
    """A tiny seeded recurrent decoder with soft attention: the step API, nothing else.

    `end_bias` is added to the end token's logit (a large negative value makes a decoder that
    never ends).
    """

    feature_kind = "spatial"
    max_words = None  # no limit on a caption's length

    def __init__(self, vocab_size=30, feature_size=8, hidden=16, end_bias=0.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab_size, hidden)
        self.project = nn.Linear(feature_size, hidden)
        self.cell = nn.GRUCell(hidden + feature_size, hidden)
        self.out = nn.Linear(hidden, vocab_size)
        with torch.no_grad():
            self.out.weight.mul_(4.0)  # peaked enough that captions differ between strategies
            self.out.bias[END_ID] += end_bias
        self.eval()

    def encode(self, features):
        return (features, self.project(features))

    def init_state(self, memory):
        return (memory[1].mean(dim=1).tanh(),)

    def step(self, tokens, state, memory):
        (hidden,) = state
        rows = len(hidden) // len(memory[0])  # the step API: k state rows per memory row
        features, keys = (m.repeat_interleave(rows, 0) for m in memory)
        alpha = torch.softmax((keys * hidden[:, None]).sum(-1), dim=1)
        context = (alpha[:, :, None] * features).sum(1)
        hidden = self.cell(torch.cat([self.embed(tokens), context], dim=1), hidden)
        return torch.log_softmax(self.out(hidden), dim=1), (hidden,), alpha


def features_for(images: int, regions: int = 4, channels: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(images, regions, channels, generator=torch.Generator().manual_seed(seed))


def score_of(decoder, features, tokens, ended: bool) -> float:
    """The summed log-probability of one token sequence, by teacher forcing one image."""
    memory = decoder.encode(features[None])
    state = decoder.init_state(memory)
    previous, total = START_ID, 0.0
    with torch.no_grad():
        for token in [*tokens, END_ID] if ended else tokens:
            log_probs, state, _ = decoder.step(torch.tensor([previous]), state, memory)
            total += float(log_probs[0, token])
            previous = token
    return total


def test_greedy_takes_the_most_likely_word_and_reports_its_log_prob():
    decoder = FakeAttentionDecoder()
    features = features_for(6)
    captions = greedy_decode(decoder, features, max_length=12)
    assert len(captions) == 6
    assert len({tuple(c.tokens) for c in captions}) > 1
    for image, caption in enumerate(captions):
        assert END_ID not in caption.tokens and START_ID not in caption.tokens
        ended = len(caption.tokens) < 12
        expected = score_of(decoder, features[image], caption.tokens, ended)
        assert caption.log_prob == pytest.approx(expected, abs=1e-4)
        assert caption.attention.shape == (len(caption.tokens), 4)
        np.testing.assert_allclose(caption.attention.sum(1), 1.0, atol=1e-5)


def test_beam_size_one_is_exactly_greedy():
    decoder = FakeAttentionDecoder()
    features = features_for(16)
    greedy = greedy_decode(decoder, features, max_length=10)
    beam = beam_search(decoder, features, DecodingConfig(beam_size=1, max_length=10))
    assert [c.tokens for c in beam] == [c.tokens for c in greedy]
    assert [c.log_prob for c in beam] == pytest.approx([c.log_prob for c in greedy], abs=1e-5)
    for b, g in zip(beam, greedy, strict=True):
        np.testing.assert_allclose(b.attention, g.attention, atol=1e-6)


def test_batched_beam_equals_one_image_at_a_time():
    decoder = FakeAttentionDecoder()
    features = features_for(10)
    config = DecodingConfig(beam_size=4, max_length=12, length_penalty=0.7)
    batched = beam_search(decoder, features, config)
    single = [beam_search(decoder, features[i : i + 1], config)[0] for i in range(10)]
    assert [c.tokens for c in batched] == [c.tokens for c in single]
    assert [c.log_prob for c in batched] == pytest.approx([c.log_prob for c in single], abs=1e-4)
    for b, s in zip(batched, single, strict=True):
        np.testing.assert_allclose(b.attention, s.attention, atol=1e-5)


def test_finished_images_leave_the_batch():
    """The rows stepped shrink as images finish, and the captions are those of a full batch."""

    class CountingDecoder(FakeAttentionDecoder):
        def __init__(self):
            super().__init__()
            self.rows: list[int] = []

        def step(self, tokens, state, memory):
            self.rows.append(len(tokens))
            return super().step(tokens, state, memory)

    decoder = CountingDecoder()
    features = features_for(10)
    config = DecodingConfig(beam_size=3, max_length=12)
    batched = beam_search(decoder, features, config)
    assert decoder.rows[0] == 30 and decoder.rows == sorted(decoder.rows, reverse=True)
    assert decoder.rows[-1] < 30  # some images were done before the last step
    single = [beam_search(decoder, features[i : i + 1], config)[0] for i in range(10)]
    assert [c.tokens for c in batched] == [c.tokens for c in single]
    assert [c.log_prob for c in batched] == pytest.approx([c.log_prob for c in single], abs=1e-4)
    for b, s in zip(batched, single, strict=True):
        np.testing.assert_allclose(b.attention, s.attention, atol=1e-5)


def test_a_wide_enough_beam_finds_the_most_likely_caption():
    """With more beams than prefixes the search is exhaustive: compare with brute force."""
    import itertools

    decoder = FakeAttentionDecoder(vocab_size=7, seed=5)
    features = features_for(4)
    words = [3, 4, 5, 6]  # <unk> and three words; <pad>/<start> are never generated
    config = DecodingConfig(beam_size=30, max_length=3, length_penalty=0.0)
    for image, caption in enumerate(beam_search(decoder, features, config)):
        candidates = [
            (score_of(decoder, features[image], list(prefix), ended=True), list(prefix))
            for length in range(3)
            for prefix in itertools.product(words, repeat=length)
        ] + [
            (score_of(decoder, features[image], list(full), ended=False), list(full))
            for full in itertools.product(words, repeat=3)
        ]
        best_score, best_tokens = max(candidates)
        assert caption.tokens == best_tokens
        assert caption.log_prob == pytest.approx(best_score, abs=1e-4)


def test_beam_search_changes_some_greedy_captions():
    decoder = FakeAttentionDecoder()
    features = features_for(12)
    greedy = greedy_decode(decoder, features, max_length=12)
    beam = beam_search(decoder, features, DecodingConfig(beam_size=5, max_length=12))
    assert any(b.tokens != g.tokens for b, g in zip(beam, greedy, strict=True))
    for image, caption in enumerate(beam):
        ended = len(caption.tokens) < 12
        expected = score_of(decoder, features[image], caption.tokens, ended)
        assert caption.log_prob == pytest.approx(expected, abs=1e-4)


def test_a_beam_that_never_ends_still_returns_its_best_hypothesis():
    decoder = FakeAttentionDecoder(end_bias=-1e4)
    features = features_for(3)
    for captions in (
        beam_search(decoder, features, DecodingConfig(beam_size=3, max_length=7)),
        greedy_decode(decoder, features, max_length=7),
    ):
        for image, caption in enumerate(captions):
            assert len(caption.tokens) == 7 and END_ID not in caption.tokens
            expected = score_of(decoder, features[image], caption.tokens, ended=False)
            assert caption.log_prob == pytest.approx(expected, abs=1e-4)
            assert math.isfinite(caption.log_prob)
            assert caption.attention.shape == (7, 4)


def test_min_length_holds_the_end_token_back():
    decoder = FakeAttentionDecoder(end_bias=6.0)  # ends almost at once when allowed
    features = features_for(5)
    assert min(len(c.tokens) for c in greedy_decode(decoder, features, max_length=10)) < 3
    for config in (
        DecodingConfig(strategy="greedy", min_length=3, max_length=10),
        DecodingConfig(strategy="beam", beam_size=3, min_length=3, max_length=10),
        DecodingConfig(strategy="sample", min_length=3, max_length=10),
    ):
        assert all(len(c.tokens) >= 3 for c in generate(decoder, features, config))


def repeated_ngrams(tokens: list[int], n: int) -> int:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def test_no_repeat_ngram_size_blocks_repeats():
    decoder = FakeAttentionDecoder(end_bias=-1e4, seed=3)
    features = features_for(8)
    plain = greedy_decode(decoder, features, max_length=20)
    assert sum(repeated_ngrams(c.tokens, 2) for c in plain) > 0  # the fake decoder loops
    for strategy in ("greedy", "beam", "sample"):
        config = DecodingConfig(strategy=strategy, max_length=20, no_repeat_ngram_size=2)
        captions = generate(decoder, features, config)
        assert all(repeated_ngrams(c.tokens, 2) == 0 for c in captions), strategy
    unigram = generate(decoder, features, DecodingConfig(max_length=20, no_repeat_ngram_size=1))
    assert all(len(set(c.tokens)) == len(c.tokens) for c in unigram)


def test_length_penalty_favours_longer_captions():
    decoder = FakeAttentionDecoder()
    features = features_for(12)

    def mean_length(penalty):
        config = DecodingConfig(beam_size=5, max_length=15, length_penalty=penalty)
        return np.mean([len(c.tokens) for c in beam_search(decoder, features, config)])

    assert mean_length(2.0) >= mean_length(0.0)


def test_sampling_is_reproducible_with_a_seed_and_varies_without():
    decoder = FakeAttentionDecoder()
    features = features_for(8)
    config = DecodingConfig(strategy="sample", max_length=12, temperature=1.5, seed=7)
    first, again = sample(decoder, features, config), sample(decoder, features, config)
    assert [c.tokens for c in first] == [c.tokens for c in again]
    other = sample(decoder, features, DecodingConfig(strategy="sample", max_length=12, seed=8))
    assert [c.tokens for c in first] != [c.tokens for c in other]
    for image, caption in enumerate(first):
        ended = len(caption.tokens) < 12
        expected = score_of(decoder, features[image], caption.tokens, ended)
        assert caption.log_prob == pytest.approx(expected, abs=1e-4)


def test_top_k_one_sampling_is_greedy():
    decoder = FakeAttentionDecoder()
    features = features_for(8)
    config = DecodingConfig(strategy="sample", max_length=10, top_k=1, temperature=2.0)
    assert [c.tokens for c in sample(decoder, features, config)] == [
        c.tokens for c in greedy_decode(decoder, features, max_length=10)
    ]


def test_decoders_without_attention_return_no_maps():
    class NoAttention(FakeAttentionDecoder):
        def step(self, tokens, state, memory):
            log_probs, state, _ = super().step(tokens, state, memory)
            return log_probs, state, None

    decoder = NoAttention()
    for strategy in ("greedy", "beam", "sample"):
        captions = generate(decoder, features_for(3), DecodingConfig(strategy=strategy))
        assert all(c.attention is None for c in captions)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError):
        DecodingConfig(strategy="nucleus")
    with pytest.raises(ValueError, match="beam_size >= 1"):
        DecodingConfig(beam_size=0)
    with pytest.raises(ValueError, match="min_length <= max_length"):
        DecodingConfig(min_length=30, max_length=20)


@pytest.mark.parametrize("model", ["show-tell", "show-attend-tell"])
def test_real_decoders_beam_one_is_greedy_and_batched_beam_is_per_image(model):
    from captioner.models import DecoderConfig, build_decoder

    torch.manual_seed(0)
    config = DecoderConfig(model, 40, 8, embed_size=16, hidden_size=24, attention_size=12)
    decoder = build_decoder(config).eval()
    with torch.no_grad():
        decoder.head[1].weight.mul_(8.0)  # a random head is nearly uniform; make it opinionated
    features = features_for(6)
    if decoder.feature_kind == "pooled":
        features = features.mean(dim=1)
    greedy = greedy_decode(decoder, features, max_length=10)
    beam_one = beam_search(decoder, features, DecodingConfig(beam_size=1, max_length=10))
    assert [c.tokens for c in beam_one] == [c.tokens for c in greedy]
    config = DecodingConfig(beam_size=3, max_length=10)
    batched = beam_search(decoder, features, config)
    single = [beam_search(decoder, features[i : i + 1], config)[0] for i in range(6)]
    assert [c.tokens for c in batched] == [c.tokens for c in single]
    assert [c.log_prob for c in batched] == pytest.approx([c.log_prob for c in single], abs=1e-4)
    for caption in batched:
        if model == "show-attend-tell":
            assert caption.attention.shape == (len(caption.tokens), 4)
        else:
            assert caption.attention is None


STRATEGIES = [
    DecodingConfig("greedy", max_length=6),
    DecodingConfig("beam", beam_size=3, max_length=6),
    DecodingConfig("sample", max_length=6, seed=2),
]


@pytest.mark.parametrize("config", STRATEGIES, ids=lambda config: config.strategy)
def test_an_empty_caption_is_a_caption_with_attention_over_no_words(config):
    decoder = FakeAttentionDecoder(end_bias=50.0)  # <end> first, always
    captions = generate(decoder, features_for(3), config)
    assert [c.tokens for c in captions] == [[], [], []] and all(c.ended for c in captions)
    assert all(c.attention.shape == (0, 4) for c in captions)  # still an attention model's
    assert all(math.isfinite(c.log_prob) for c in captions)


@pytest.mark.parametrize("config", STRATEGIES, ids=lambda config: config.strategy)
def test_a_caption_with_every_word_forbidden_ends_there(config):
    """Five words that may be said (ids 3-7, <unk> among them), none twice, and no end before the
    sixth: after five words nothing is allowed, so the caption ends there (it used to take
    <pad>, or leave beam search without any hypothesis)."""
    decoder = FakeAttentionDecoder(vocab_size=8, end_bias=-50.0)
    options = dict(min_length=6, no_repeat_ngram_size=1)
    captions = generate(decoder, features_for(3), DecodingConfig(**{**vars(config), **options}))
    for caption in captions:
        assert sorted(caption.tokens) == [3, 4, 5, 6, 7] and caption.ended
        assert math.isfinite(caption.log_prob)


@pytest.mark.parametrize("config", STRATEGIES, ids=lambda config: config.strategy)
def test_nan_probabilities_stop_decoding_in_one_line(config):
    decoder = FakeAttentionDecoder()
    features = features_for(2)
    features[1, 0, 0] = float("nan")
    with pytest.raises(CaptionerError, match="probabilities are NaN") as error:
        generate(decoder, features, config)
    assert "\n" not in str(error.value)
