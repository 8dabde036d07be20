"""Proof that the system learns: the demo pipeline, small, on held-out synthetic scenes.

Every decoder must caption the test images far better than the best constant caption (computed
here, with hindsight: the most frequent training caption that scores best on the test split), and
the attention model and the transformer must read layout at least as well as the model that sees
a pooled vector, and far better than chance (measured by the minimal-pair probe: a reference
against the same words with left/right swapped).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
from inference_factories import report_data

from captioner.demo import MODELS, DemoConfig, DemoResult, run_demo, scst_name
from captioner.encoder import EncoderConfig
from captioner.metrics import corpus_bleu4
from captioner.store import FeatureStore
from captioner.text import tokenize

pytestmark = pytest.mark.slow

# About five minutes on two quiet CPU cores; the demo's defaults train two and a half times as long.
# Two captions per image and half the epochs: the same steps with half the validation passes.
SMALL = {
    "images": 3000, "epochs": 8, "captions_per_image": 2, "fresh_images": 4, "figures": 1,
    "workers": 1, "device": "cpu",  # the thresholds were set on CPU runs
    "scst_epochs": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoResult:
    root = tmp_path_factory.mktemp("demo")
    config = DemoConfig(root=root, encoder=EncoderConfig("tiny", "none", 96), **SMALL)
    return run_demo(config)


def test_every_decoder_beats_the_best_constant_caption_on_held_out_images(demo):
    references = _test_references(demo.config.store)
    images = sorted(references)
    refs = [references[image] for image in images]
    constant = max(
        corpus_bleu4(refs, [list(caption)] * len(images))
        for caption, _ in _train_captions(demo.config.store).most_common(20)
    )
    for model in MODELS:
        generated = _generated(demo.config.results(model) / "captions.csv")
        bleu4 = corpus_bleu4(refs, [tokenize(generated[image]) for image in images])
        assert bleu4 > constant + 0.05 and bleu4 > 1.2 * constant, (model, bleu4, constant)


# Well above the 0.5 of a decoder blind to layout (the test split's ~760 minimal pairs put 0.5's
# standard error near 0.02). On these small runs the attention LSTM reached 0.72 and the
# transformer 0.57-0.59 over three initializations of its grid positions, while Show-and-Tell sat
# at 0.52: the transformer learns where things are from position tables it must learn first, and
# gets further with the demo's 20 epochs and 6,000 images (bench/RESULTS.md [demo]).
LAYOUT_FLOOR = {"show-attend-tell": 0.62, "transformer": 0.55}


@pytest.mark.parametrize("model", sorted(LAYOUT_FLOOR))
def test_the_attention_models_read_layout_at_least_as_well_as_the_pooled_one(demo, model):
    attention = demo.outcomes[model].layout_preference
    pooled = demo.outcomes["show-tell"].layout_preference
    assert attention >= pooled, (attention, pooled)
    assert attention >= LAYOUT_FLOOR[model], attention


def test_self_critical_fine_tuning_starts_from_the_best_model_and_keeps_it_whole(demo):
    """One SCST epoch here (the demo runs three, bench/RESULTS.md [scst]): it starts from the
    best epoch of the decoder with the best validation CIDEr-D and leaves a model that scores
    as well on held-out images."""
    *trained, fine_tuned = demo.models
    assert trained == list(MODELS)

    def validation_cider(model: str) -> float:
        result = demo.outcomes[model].training
        return next(r for r in result.history if r["epoch"] == result.best_epoch)["val_cider"]

    base = max(MODELS, key=validation_cider)
    assert fine_tuned == scst_name(base)
    scst = demo.outcomes[fine_tuned]
    assert scst.training.selection_metric == "val_cider"
    assert [row["epoch"] for row in scst.training.history] == [0, 1]  # the start, then SCST
    assert scst.training.history[1]["mean_reward"] > 0
    start = demo.outcomes[base]
    assert scst.metrics["CIDEr-D"] >= 0.95 * start.metrics["CIDEr-D"], (scst, start)


def test_the_demo_ends_with_a_report_of_every_test_image_with_picture_and_attention(demo):
    cards = report_data(demo.report)["cards"]
    generated = _generated(demo.config.results(demo.models[-1]) / "captions.csv")
    assert {card["id"]: card["caption"] for card in cards} == generated
    assert all("thumb" in card and "strip" in card for card in cards)


def _test_references(store: Path) -> dict[str, list[list[str]]]:
    corpus = FeatureStore.open(store).corpus()
    by_image = corpus.captions_by_image()
    return {
        image.id: [list(corpus.captions[c].tokens) for c in by_image[row]]
        for row, image in enumerate(corpus.images)
        if image.split == "test"
    }


def _train_captions(store: Path) -> Counter:
    corpus = FeatureStore.open(store).corpus()
    return Counter(c.tokens for c in corpus.captions if corpus.images[c.image].split == "train")


def _generated(captions_csv: Path) -> dict[str, str]:
    with open(captions_csv, newline="", encoding="utf-8") as file:
        return {row["image_id"]: row["caption"] for row in csv.DictReader(file)}
