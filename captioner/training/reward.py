"""The self-critical reward: the CIDEr-D of a decoded caption against its image's references, with
document frequencies from the train split's references (as self-critical training does).

The end token counts as a word, in the references and in every caption that ended, so a caption
cut off at the length limit ("a man with a") matches no reference's last n-grams and earns less
than one that ends where the references do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from captioner.cider import CiderD
from captioner.corpus import Corpus
from captioner.models.decode import GeneratedCaption
from captioner.progress import ShowProgress
from captioner.text import END, Vocabulary


class CiderReward:
    """CIDEr-D rewards of captions of the images `rows` (store rows) of `corpus`."""

    def __init__(
        self,
        corpus: Corpus,
        rows: Sequence[int],
        vocabulary: Vocabulary,
        progress: ShowProgress = False,
    ) -> None:
        references = {
            row: [[*caption.tokens, END] for caption in captions]
            for row, captions in corpus.references(rows).items()
        }
        self.cider = CiderD(references, progress)
        self.vocabulary = vocabulary

    def __call__(self, captions: Sequence[GeneratedCaption], rows: Sequence[int]) -> np.ndarray:
        """(len(captions),) float64: the reward of caption i, a caption of store row `rows[i]`."""
        words = [
            caption.words(self.vocabulary) + ([END] if caption.ended else [])
            for caption in captions
        ]
        return self.cider.scores(words, rows)
