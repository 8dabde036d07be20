"""Each epoch's validation, on rank 0: the loss, greedy decodes and their BLEU-4 and CIDEr-D, the
signs of a collapsing decoder, and the per-word attention maps of one sample caption."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from captioner import visualize
from captioner.cider import CiderD
from captioner.corpus import Corpus
from captioner.images import ImageError, load_image
from captioner.metrics import corpus_bleu4
from captioner.models import CaptionDecoder
from captioner.models.decode import greedy_decode
from captioner.progress import ShowProgress
from captioner.progress import bar as progress_bar
from captioner.store import FeatureStore
from captioner.text import Vocabulary
from captioner.training.batches import FeatureStream
from captioner.training.run import Amp


@dataclass
class Validation:
    loss: float  # mean unsmoothed NLL per target token
    bleu4: float  # corpus BLEU-4 of greedy decodes against all references
    cider: float  # their CIDEr-D, document frequencies from these references (as coco-caption)
    hypotheses: dict[int, list[str]]  # store row -> decoded words
    sample_row: int
    sample_attention: np.ndarray | None  # (words, L) for the attention model

    def repeating(self) -> list[list[str]]:
        """The decodes that repeat a word three times in a row."""
        return [words for words in self.hypotheses.values() if repeated_word(words)]


def reference_words(corpus: Corpus, rows: np.ndarray) -> dict[int, list[list[str]]]:
    """Store row -> the tokens of each of its captions, for BLEU-4."""
    references = corpus.references(rows)
    return {row: [list(c.tokens) for c in captions] for row, captions in references.items()}


@torch.no_grad()
def validate(
    decoder: CaptionDecoder,
    stream: FeatureStream,
    references: dict[int, list[list[str]]],
    cider: CiderD,
    vocabulary: Vocabulary,
    max_length: int,
    amp: Amp,
    progress: ShowProgress = False,
) -> Validation:
    """Validation loss and greedy-decode BLEU-4 and CIDEr-D over every image of `stream` (in row
    order), on the decoder's device. `cider` scores against the same `references` (store row ->
    token lists): our exact CIDEr-D on the tokens, without coco-caption's Java tokenizer
    (evaluate.py gives the official figures)."""
    device = decoder.feature_mean.device
    decoder.eval()
    nll_sum, tokens = 0.0, 0
    hypotheses: dict[int, list[str]] = {}
    sample: tuple[int, np.ndarray | None] | None = None
    with progress_bar(progress, "validating", len(references), unit="img", leave=False) as shown:
        for batch in stream.epoch(0):
            batch = batch.to(device)
            with amp.autocast():
                output = decoder.training_loss(
                    batch.features, batch.image_index, batch.captions, batch.lengths
                )
                generated = greedy_decode(decoder, batch.features, max_length)
            nll_sum, tokens = nll_sum + float(output.nll_sum), tokens + output.tokens
            for row, caption in zip(batch.rows.tolist(), generated, strict=True):
                hypotheses[row] = vocabulary.decode(caption.tokens)
                if sample is None:
                    sample = (row, caption.attention)
            shown.update(len(batch.rows))
    decoder.train()
    rows = sorted(hypotheses)
    bleu4 = corpus_bleu4([references[r] for r in rows], [hypotheses[r] for r in rows])
    cider_d = float(cider.scores([hypotheses[r] for r in rows], rows).mean())
    return Validation(nll_sum / max(tokens, 1), bleu4, cider_d, hypotheses, *sample)


def repeated_word(words: list[str], times: int = 3) -> str | None:
    """The first word that occurs `times` or more times in a row (a sign of decoder collapse)."""
    run = 1
    for previous, word in zip(words, words[1:], strict=False):
        run = run + 1 if word == previous else 1
        if run >= times:
            return word
    return None


def collapse_warning(row: dict) -> str | None:
    """The warning to print when an epoch's metrics row counts repeating validation captions."""
    if not row["repeating_captions"]:
        return None
    return (
        f"warning: {row['repeating_captions']} validation captions repeat a word 3+ times in a"
        f" row (e.g. {row['repeating_example']!r}): the decoder may be collapsing"
    )


def save_sample_attention(
    out: Path, store: FeatureStore, corpus: Corpus, validation: Validation, epoch: int
) -> Path | None:
    """The sample caption's per-word attention maps (attention model only) as a PNG: overlaid on
    the image when it is reachable under the store's recorded image root, else as grid heatmaps.
    Returns the PNG's path (None for a model without attention)."""
    if validation.sample_attention is None:
        return None
    words = validation.hypotheses[validation.sample_row]
    image = None
    root = store.attrs.get("images_root")
    if root:
        with contextlib.suppress(ImageError, OSError):
            image = load_image(Path(root) / corpus.images[validation.sample_row].path)
    path = out / "attention" / f"epoch_{epoch:03d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    attention = validation.sample_attention[: len(words)]
    visualize.save_attention_figure(path, words, attention, store.grid, image)
    return path
