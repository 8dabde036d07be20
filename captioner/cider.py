"""CIDEr-D (Vedantam et al., 2015) exactly as coco-caption computes it, fast enough to be a reward.

coco-caption's scorer (pycocoevalcap.cider) weighs each 1..4-gram by its count times its inverse
document frequency, ``log(images) - log(max(1, df))``, and scores a candidate against each
reference by the cosine of those vectors, with each candidate n-gram's weight clipped to the
reference's, times a Gaussian penalty on the length difference (sigma 6; "length" is the number
of bigrams); it averages over n and the references and scales by 10. The evaluation takes the
document frequencies from the references of the images it scores; self-critical training takes
them from the train split (`CiderD.from_references` of those references).

coco-caption rebuilds every reference vector for each call, in Python. Here a reference is turned
into its weight matrix once per image and kept, and a batch of candidates is scored against its
images' references with a few array operations. tests/test_cider.py checks it against
pycocoevalcap on the same candidates, references and document frequencies.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MAX_N = 4
SIGMA = 6.0
Ngram = tuple[str, ...]
_ONE_HOT = np.eye(MAX_N)  # row n - 1: sums a value into order n


def ngram_counts(words: Sequence[str]) -> Counter[Ngram]:
    """How often each 1..4-gram occurs in `words`."""
    return Counter(
        tuple(words[start : start + n])
        for n in range(1, MAX_N + 1)
        for start in range(len(words) - n + 1)
    )


def _bigrams(words: Sequence[str]) -> int:
    """coco-caption's caption "length" in its length penalty: the number of bigrams."""
    return max(len(words) - 1, 0)


@dataclass
class _References:
    """One image's references as tf-idf weights: column j is the n-gram `ngrams[j]`."""

    column: dict[Ngram, int]  # n-gram -> column
    weights: np.ndarray  # (references, columns) float64
    norms: np.ndarray  # (references, MAX_N): the norm of each reference's n-gram vector
    lengths: np.ndarray  # (references,) bigrams


class CiderD:
    """CIDEr-D with fixed document frequencies; images are named by any hashable key.

    `references` maps each key to its reference captions (lists of words); their vectors are
    built on first use and kept, so a training run builds each image's once.
    """

    def __init__(
        self,
        document_frequency: Mapping[Ngram, int],
        images: int,
        references: Mapping[Hashable, list[list[str]]],
    ) -> None:
        self.document_frequency = document_frequency
        self.log_images = math.log(float(images))
        self.references = references
        self._vectors: dict[Hashable, _References] = {}

    @classmethod
    def from_references(cls, references: Mapping[Hashable, list[list[str]]]) -> CiderD:
        """Document frequencies from `references` themselves: in how many images' references
        each n-gram occurs (coco-caption's rule for the images it evaluates)."""
        frequency: Counter[Ngram] = Counter()
        for captions in references.values():
            frequency.update({ngram for words in captions for ngram in ngram_counts(words)})
        return cls(frequency, len(references), references)

    def scores(self, candidates: Sequence[Sequence[str]], keys: Sequence[Hashable]) -> np.ndarray:
        """(len(candidates),) float64: the CIDEr-D of candidate i against the references of image
        `keys[i]` (several candidates may share a key)."""
        if not candidates:
            return np.zeros(0)
        references = [self._reference_vectors(key) for key in keys]
        most_references = max(len(r.lengths) for r in references)
        sums = np.zeros((len(candidates), MAX_N, most_references))
        norms = np.zeros((len(candidates), MAX_N))
        for i, (words, refs) in enumerate(zip(candidates, references, strict=True)):
            counts = ngram_counts(words)
            weights, orders, _ = self._weights(counts)
            norms[i] = np.sqrt(np.bincount(orders, weights * weights, minlength=MAX_N))
            matched = np.array([refs.column.get(ngram, -1) for ngram in counts], dtype=np.int64)
            found = matched >= 0
            ref_weights = refs.weights[:, matched[found]]  # (R, matches)
            clipped = np.minimum(weights[found], ref_weights) * ref_weights
            sums[i, :, : len(refs.lengths)] = (clipped @ _ONE_HOT[orders[found]]).T
        ref_norms = np.zeros((len(candidates), MAX_N, most_references))
        ref_lengths = np.zeros((len(candidates), most_references))
        present = np.zeros((len(candidates), most_references), dtype=bool)
        for i, refs in enumerate(references):
            count = len(refs.lengths)
            ref_norms[i, :, :count] = refs.norms.T
            ref_lengths[i, :count] = refs.lengths
            present[i, :count] = True
        denominator = norms[:, :, None] * ref_norms
        cosine = np.divide(sums, denominator, out=sums.copy(), where=denominator != 0)
        lengths = np.array([_bigrams(words) for words in candidates], dtype=np.float64)
        delta = lengths[:, None] - ref_lengths
        penalty = np.exp(-(delta**2) / (2 * SIGMA**2)) * present
        per_reference = cosine.mean(1) * penalty  # (candidates, references)
        return 10.0 * per_reference.sum(1) / present.sum(1)

    def _weights(self, counts: Counter[Ngram]) -> tuple[np.ndarray, np.ndarray, list[Ngram]]:
        """tf-idf weights and n - 1 of each n-gram of `counts`, in its order."""
        ngrams = list(counts)
        frequency = self.document_frequency
        weights = np.array(
            [
                counts[ngram] * (self.log_images - math.log(max(1.0, frequency.get(ngram, 0))))
                for ngram in ngrams
            ],
            dtype=np.float64,
        )
        orders = np.array([len(ngram) - 1 for ngram in ngrams], dtype=np.int64)
        return weights, orders, ngrams

    def _reference_vectors(self, key: Hashable) -> _References:
        if key not in self._vectors:
            captions = self.references[key]
            counts = [ngram_counts(words) for words in captions]
            column: dict[Ngram, int] = {}
            for caption in counts:
                for ngram in caption:
                    column.setdefault(ngram, len(column))
            weights = np.zeros((len(captions), len(column)))
            norms = np.zeros((len(captions), MAX_N))
            for r, caption in enumerate(counts):
                values, orders, ngrams = self._weights(caption)
                weights[r, [column[ngram] for ngram in ngrams]] = values
                norms[r] = np.sqrt(np.bincount(orders, values * values, minlength=MAX_N))
            lengths = np.array([_bigrams(words) for words in captions], dtype=np.float64)
            self._vectors[key] = _References(column, weights, norms, lengths)
        return self._vectors[key]
