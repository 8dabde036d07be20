"""Tokenization and the vocabulary: the one place where caption text becomes token ids."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nltk.tokenize import RegexpTokenizer

from captioner.files import atomic_file
from captioner.progress import ShowProgress, tracked

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)
NEVER_GENERATED = (PAD_ID, START_ID)  # tokens no decoding strategy ever emits

# Runs of letters and digits (any script); everything else, punctuation included, separates words.
# A regexp tokenizer needs no downloaded NLTK data (punkt cannot be fetched everywhere).
_WORDS = RegexpTokenizer(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words with punctuation removed:
    ``"A dog's ball."`` -> ``["a", "dog", "s", "ball"]``."""
    return _WORDS.tokenize(text.lower())


@dataclass
class Vocabulary:
    """Words by id. Ids 0-3 are the special tokens; the rest are sorted by count, then
    alphabetically."""

    words: list[str]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with {SPECIAL_TOKENS}")
        self.index = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def build(
        cls,
        token_lists: Iterable[Sequence[str]],
        min_count: int = 5,
        progress: ShowProgress = False,
    ) -> Vocabulary:
        """Keep the words seen at least `min_count` times (pass the train split's tokens only)."""
        counted = tracked(token_lists, progress, "vocabulary", unit="cap")
        counts = Counter(token for tokens in counted for token in tokens)
        kept = [word for word, n in counts.items() if n >= min_count and word not in SPECIAL_TOKENS]
        kept.sort(key=lambda word: (-counts[word], word))
        return cls(list(SPECIAL_TOKENS) + kept)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Sequence[str], max_length: int | None = None) -> list[int]:
        """``<start> w1 .. wn <end>`` as ids; at most `max_length` words (the end token is kept)."""
        words = tokens if max_length is None else tokens[:max_length]
        return [START_ID, *(self.index.get(word, UNK_ID) for word in words), END_ID]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first end token, without start and padding."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i not in (START_ID, PAD_ID):
                words.append(self.words[i])
        return words

    def save(self, path: Path) -> None:
        """vocab.json, for people and other tools (checkpoints carry their own vocabulary)."""
        with atomic_file(path, "w", encoding="utf-8") as file:
            json.dump({"words": self.words}, file, ensure_ascii=False, indent=0)
