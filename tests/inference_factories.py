"""Checkpoints for the inference tests: real decoders (random weights) over a test store.

Import as ``from inference_factories import make_checkpoint`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from captioner.checkpoint import Checkpoint, save_checkpoint
from captioner.encoder import EncoderConfig
from captioner.models import DecoderConfig, build_decoder
from captioner.store import FeatureStore, corpus_digest
from captioner.text import Vocabulary

# Small decoders: the LSTMs' sizes, and the transformer's (its width is embed = hidden size).
SIZES = {"embed_size": 16, "hidden_size": 24, "attention_size": 12}
TRANSFORMER_SIZES = {
    "embed_size": 24, "hidden_size": 24, "decoder_layers": 2, "heads": 4, "ff_size": 32,
}  # fmt: skip


def make_checkpoint(
    path: Path,
    store_path: Path,
    model: str = "show-attend-tell",
    *,
    seed: int = 0,
    vocabulary: Vocabulary | None = None,
    feature_size: int | None = None,
    encoder: EncoderConfig | None = None,
) -> Path:
    """A small untrained decoder saved as if trained on the store at `store_path`: vocabulary from
    its train captions (min count 1), its encoder config and weights, fingerprint and
    corpus digest. The keyword arguments make deliberately mismatched checkpoints."""
    store = FeatureStore.open(store_path)
    corpus = store.corpus()
    vocabulary = vocabulary or Vocabulary.build(corpus.tokens_of_split("train"), min_count=1)
    config = DecoderConfig(
        model,
        len(vocabulary),
        feature_size or store.channels,
        dropout=0.0,
        **(TRANSFORMER_SIZES if model == "transformer" else SIZES),
    )
    torch.manual_seed(seed)
    decoder = build_decoder(config)
    with torch.no_grad():
        decoder.head[1].weight.mul_(6.0)  # an untrained head is nearly uniform; make it decisive
    checkpoint = Checkpoint(
        decoder_config=config,
        state_dict=decoder.state_dict(),
        vocabulary=vocabulary,
        encoder_config=encoder or store.encoder_config,
        store_fingerprint=store.fingerprint,
        training={"epoch": 1, "metrics": {}, "options": {}},
        weights_id=store.settings.weights_id,
        weights_checksum=store.settings.weights_checksum,
        corpus_sha256=corpus_digest(corpus),
    )
    save_checkpoint(path, checkpoint)
    return path


def report_data(page: Path) -> dict:
    """The JSON a report.html page renders its cards from."""
    text = Path(page).read_text("utf-8")
    match = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S
    )
    assert match, f"{page}: no data block"
    return json.loads(match[1])
