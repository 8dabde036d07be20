"""Caption metrics: a fast corpus BLEU-4 for validation, the coco-caption scores for reports."""

from __future__ import annotations

import warnings

from nltk.translate.bleu_score import corpus_bleu


def corpus_bleu4(references: list[list[list[str]]], hypotheses: list[list[str]]) -> float:
    """NLTK corpus BLEU-4 in [0, 1] (no smoothing): for each hypothesis, its tokenized references.

    Quick enough to run on greedy decodes every epoch; it is not the coco-caption number.
    """
    if not hypotheses:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns when some n-gram order has no match at all
        return float(corpus_bleu(references, hypotheses, weights=(0.25, 0.25, 0.25, 0.25)))
