"""CIDEr-D (captioner.cider) against coco-caption's own scorer, pycocoevalcap, on the same
candidates, references and document frequencies; and the self-critical reward built on it."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captioner.cider import CiderD, ngram_counts
from captioner.corpus import CaptionRecord, Corpus, ImageRecord
from captioner.models.decode import GeneratedCaption
from captioner.text import Vocabulary
from captioner.training.reward import CiderReward

WORDS = "a the dog man red blue ball runs on grass with two".split()


def random_caption(rng: random.Random, longest: int = 12) -> list[str]:
    """Anything from no word to `longest`, with repeats: the clipping and the length penalty
    both matter, and so do captions of zero and one word (no bigram)."""
    return [rng.choice(WORDS) for _ in range(rng.randint(0, longest))]


def random_references(rng: random.Random, images: int) -> dict[int, list[list[str]]]:
    return {
        image: [random_caption(rng) for _ in range(rng.randint(1, 6))] for image in range(images)
    }


def test_ngram_counts_are_the_1_to_4_grams():
    counts = ngram_counts("a dog a dog".split())
    assert counts[("a",)] == 2 and counts[("a", "dog")] == 2 and counts[("dog", "a")] == 1
    assert counts[("a", "dog", "a", "dog")] == 1 and sum(counts.values()) == 4 + 3 + 2 + 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_coco_caption_when_scoring_a_split(seed):
    """Evaluation: one candidate per image, document frequencies from those images' references."""
    rng = random.Random(seed)
    references = random_references(rng, 30)
    candidates = {image: random_caption(rng) for image in references}
    theirs_mean, theirs = Cider().compute_score(
        {i: [" ".join(r) for r in refs] for i, refs in references.items()},
        {i: [" ".join(words)] for i, words in candidates.items()},
    )
    ours = CiderD(references).scores(list(candidates.values()), list(candidates))
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    assert ours.mean() == pytest.approx(theirs_mean, rel=1e-12)
    assert ours.max() > 0.5  # some candidates do match: the comparison is not of zeros


class _AllTrainImages(list):
    """pycocoevalcap takes log(number of images) from len(crefs); with document frequencies
    from the train split it must be the train split's count."""

    images = 0

    def __len__(self) -> int:
        return self.images


def coco_caption_scores(
    train: dict[int, list[list[str]]], candidates: list[list[str]], keys: list[int]
) -> np.ndarray:
    """pycocoevalcap's CIDEr-D of each candidate against the references of its key, with the
    document frequencies of all of `train`'s references (as self-critical training scores)."""
    frequencies = CiderScorer(n=4, sigma=6.0)
    for refs in train.values():
        frequencies += ("", [" ".join(r) for r in refs])
    frequencies.compute_doc_freq()
    scorer = CiderScorer(n=4, sigma=6.0)
    for words, key in zip(candidates, keys, strict=True):
        scorer += (" ".join(words), [" ".join(r) for r in train[key]])
    scorer.crefs = _AllTrainImages(scorer.crefs)
    scorer.crefs.images = len(train)
    scorer.document_frequency = frequencies.document_frequency
    return np.array(scorer.compute_cider())


def test_equals_coco_caption_with_train_split_document_frequencies():
    """Reward: several candidates per image, scored with the train references' frequencies."""
    rng = random.Random(7)
    train = random_references(rng, 40)
    keys = [rng.randrange(40) for _ in range(120)]
    candidates = [random_caption(rng) for _ in keys]
    ours = CiderD(train).scores(candidates, keys)
    np.testing.assert_allclose(ours, coco_caption_scores(train, candidates, keys), atol=1e-12)
    assert (ours > 0).sum() > 30


def test_equals_coco_caption_at_the_edges():
    """Empty candidates and references, one-word ones (no bigram), words no reference has, a
    candidate equal to its only reference."""
    train = {0: [[]], 1: [["a"]], 2: [["a", "dog"], ["two", "men", "run"]], 3: [["a", "dog"]]}
    candidates = [[], ["a"], ["zebra"], ["a", "dog"], [], ["a", "dog"], ["zebra", "a", "dog"]]
    keys = [0, 1, 1, 2, 2, 3, 3]
    ours = CiderD(train).scores(candidates, keys)
    np.testing.assert_allclose(ours, coco_caption_scores(train, candidates, keys), atol=1e-12)
    assert ours[5] > 0 and ours[0] == 0


def test_a_reference_scores_highest_against_its_own_image():
    references = {
        0: [["a", "red", "ball"], ["a", "red", "ball", "on", "grass"]],
        1: [["two", "men"], ["two", "men", "runs"]],
    }
    cider = CiderD(references)
    scores = cider.scores([["a", "red", "ball"]] * 2 + [["two", "men"]] * 2, [0, 1, 0, 1])
    assert scores[0] > scores[1] and scores[3] > scores[2]


def test_the_reward_credits_the_end_token_only_to_captions_that_ended():
    """A caption cut off at the length limit matches no reference's final n-grams."""
    images = [ImageRecord(f"{i}.jpg", f"{i}.jpg", "train") for i in range(3)]
    texts = ["a man with a dog", "a red ball", "two men on grass"]
    captions = [CaptionRecord(i, text, tuple(text.split())) for i, text in enumerate(texts)]
    corpus = Corpus("generated", ["generated"], images, captions)
    vocabulary = Vocabulary.build([c.tokens for c in captions], min_count=1)
    reward = CiderReward(corpus, [0, 1, 2], vocabulary)
    tokens = [vocabulary.index[word] for word in "a man with a dog".split()]
    ended = GeneratedCaption(tokens, 0.0, None, ended=True)
    cut_off = GeneratedCaption(tokens, 0.0, None, ended=False)
    rewards = reward([ended, cut_off], [0, 0])
    assert rewards[0] > rewards[1] > 0
