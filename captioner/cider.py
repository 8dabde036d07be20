"""CIDEr-D (Vedantam et al., 2015) exactly as coco-caption computes it, fast enough to be a reward.

coco-caption's scorer (pycocoevalcap.cider) weighs each 1..4-gram by its count times its inverse
document frequency, ``log(images) - log(max(1, df))``, and scores a candidate against each
reference by the cosine of those vectors, with each candidate n-gram's weight clipped to the
reference's, times a Gaussian penalty on the length difference (sigma 6; "length" is the number
of bigrams); it averages over n and the references and scales by 10. The evaluation takes the
document frequencies from the references of the images it scores; self-critical training takes
them from the train split: `CiderD(references)` takes them from the references it is given.

coco-caption rebuilds every reference vector for each call, in Python. Here each n-gram of the
references gets an integer id and its idf once; an image's references become a small matrix of
n-gram counts on first use and are kept (5.5 KB an image on Flickr8k's train captions with their
end tokens, measured by bench/scst.py: about 0.6 GB for MS-COCO's 113k train images); a batch of
candidates is scored against its images' references with a few array operations.
tests/test_cider.py checks it against pycocoevalcap on the same candidates, references and
document frequencies.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from captioner.progress import ShowProgress, tracked

MAX_N = 4
SIGMA = 6.0
Ngram = tuple[str, ...]
_ONE_HOT = np.eye(MAX_N)  # row n - 1 sums a value into order n


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
    """One image's references: column j counts the n-gram of id `ids[j]` (ids ascending)."""

    ids: np.ndarray  # (columns,) int64
    counts: np.ndarray  # (references, columns) int32
    norms: np.ndarray  # (references, MAX_N): the norm of each reference's tf-idf vector
    lengths: np.ndarray  # (references,) bigrams


class CiderD:
    """CIDEr-D against `references` (image key -> its reference captions, lists of words), with
    document frequencies from those references themselves: in how many images' references each
    n-gram occurs. That is coco-caption's rule for the images it evaluates, and self-critical
    training's when `references` are the train split's. Each image's reference vectors are
    built on first use and kept, so a training run builds each image's once.
    """

    def __init__(
        self, references: Mapping[Hashable, list[list[str]]], progress: ShowProgress = False
    ) -> None:
        frequency: Counter[Ngram] = Counter()
        images = tracked(references.values(), progress, "CIDEr-D document frequencies", unit="img")
        for captions in images:
            frequency.update({ngram for words in captions for ngram in ngram_counts(words)})
        self.references = references
        self.log_images = math.log(float(len(references)))
        self._id = {ngram: number for number, ngram in enumerate(frequency)}
        self._idf = self.log_images - np.log(np.fromiter(frequency.values(), dtype=np.float64))
        self._vectors: dict[Hashable, _References] = {}

    def scores(self, candidates: Sequence[Sequence[str]], keys: Sequence[Hashable]) -> np.ndarray:
        """(len(candidates),) float64: the CIDEr-D of candidate i against the references of image
        `keys[i]` (several candidates may share a key)."""
        if not candidates:
            return np.zeros(0)
        references = [self._reference_vectors(key) for key in keys]
        most = max(len(refs.lengths) for refs in references)
        sums = np.zeros((len(candidates), MAX_N, most))
        norms = np.zeros((len(candidates), MAX_N))
        ref_norms = np.zeros((len(candidates), MAX_N, most))
        ref_lengths = np.zeros((len(candidates), most))
        present = np.zeros((len(candidates), most), dtype=bool)
        for i, (words, refs) in enumerate(zip(candidates, references, strict=True)):
            counts = ngram_counts(words)
            ids = np.array([self._id.get(ngram, -1) for ngram in counts], dtype=np.int64)
            orders = np.array([len(ngram) - 1 for ngram in counts], dtype=np.int64)
            # an n-gram in no reference of the frequency set has df 0: idf log(images)
            idf = np.where(ids >= 0, self._idf[ids], self.log_images)
            weights = np.fromiter(counts.values(), dtype=np.float64, count=len(counts)) * idf
            norms[i] = np.sqrt(np.bincount(orders, weights * weights, minlength=MAX_N))
            columns = np.searchsorted(refs.ids, ids)
            found = (ids >= 0) & (columns < len(refs.ids))
            found[found] = refs.ids[columns[found]] == ids[found]
            ref_weights = refs.counts[:, columns[found]] * self._idf[ids[found]]  # (R, matches)
            clipped = np.minimum(weights[found], ref_weights) * ref_weights
            count = len(refs.lengths)
            sums[i, :, :count] = (clipped @ _ONE_HOT[orders[found]]).T
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

    def _reference_vectors(self, key: Hashable) -> _References:
        if key not in self._vectors:
            captions = [ngram_counts(words) for words in self.references[key]]
            every = [self._id[ngram] for counts in captions for ngram in counts]
            ids = np.unique(np.array(every, dtype=np.int64))
            counts = np.zeros((len(captions), len(ids)), dtype=np.int32)
            norms = np.zeros((len(captions), MAX_N))
            for r, caption in enumerate(captions):
                own = np.array([self._id[ngram] for ngram in caption], dtype=np.int64)
                columns = np.searchsorted(ids, own)
                counts[r, columns] = list(caption.values())
                weights = counts[r, columns] * self._idf[own]
                orders = np.array([len(ngram) - 1 for ngram in caption], dtype=np.int64)
                norms[r] = np.sqrt(np.bincount(orders, weights * weights, minlength=MAX_N))
            lengths = np.array([_bigrams(words) for words in self.references[key]], dtype=float)
            self._vectors[key] = _References(ids, counts, norms, lengths)
        return self._vectors[key]
