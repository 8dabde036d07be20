"""Evaluation: caption a split of a feature store with a checkpoint and score it like the papers.

Outputs in the `out` directory: `metrics.json` (the scores and how they were computed),
`captions.csv` (image_id, caption, log_prob, references), `results.json` (the COCO results format,
``[{"image_id", "caption"}]``), `report.html` (a page to look at every image's caption, references,
per-image scores and attention; captioner.inference.report) and, with `visualize`,
`attention/<image>.png`. `captioner.inference.score` scores another system's captions the same way.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from captioner import visualize
from captioner.checkpoint import Checkpoint, load_checkpoint, require_finite_weights
from captioner.corpus import Corpus
from captioner.devices import resolve_device
from captioner.errors import CaptionerError
from captioner.files import atomic_file, require_writable_folder, spreadsheet_safe, write_json
from captioner.images import ImageError, load_image
from captioner.inference.report import (
    REPORT_NAME,
    Card,
    ReportPage,
    describe_config,
    image_root,
    write_report,
)
from captioner.metrics import (
    COCO,
    MetricsReport,
    check_java,
    resolved_implementation,
    score_captions,
    start_meteor,
)
from captioner.models import load_native_attention
from captioner.models.decode import DecodingConfig, GeneratedCaption, generate
from captioner.option_checks import at_least, check_options, one_of
from captioner.precision import PRECISIONS, resolve_precision
from captioner.progress import ShowProgress
from captioner.progress import bar as progress_bar
from captioner.progress import write as write_line
from captioner.store import (
    FeatureStore,
    StoreLocation,
    corpus_digest,
    split_rows,
    training_corpus,
)
from captioner.text import SPECIAL_TOKENS

# A checkpoint trained on another store is accepted when at least this share of its words occur
# in this store's captions (the same dataset re-extracted); a vocabulary from another dataset
# falls far below.
MIN_VOCABULARY_COVERAGE = 0.9
REFERENCE_SEPARATOR = " | "


@dataclass
class EvaluateConfig:
    checkpoint: Path
    features: StoreLocation  # a folder, or a RemoteStore in object storage
    out: Path
    split: str = "test"
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"  # "auto" | "float32" | "bfloat16" (captioner.precision)
    metrics: str = "auto"  # "auto" | "coco-caption" | "nltk-fallback"
    visualize: int = 0  # attention figures for this many images
    images: Path | None = None  # image root for the figures; default: the one extraction used
    # Attention model on a CPU: the compiled attention scores, as in training (TrainConfig).
    native_attention: bool = True


@dataclass
class EvaluationResult:
    report: MetricsReport
    out: Path
    images: int
    figures: int
    notes: list[str]


def evaluate(config: EvaluateConfig, progress: ShowProgress = False) -> EvaluationResult:
    """Decode the split from stored features, score it, write the outputs (see the module doc)."""
    check_options(
        config,
        {"batch_size": at_least(1), "visualize": at_least(0), "precision": one_of(PRECISIONS)},
    )
    require_writable_folder(config.out)  # before the decoding, not after it
    if config.metrics == COCO:
        check_java()  # before the decoding, not after it
    checkpoint, _ = load_checkpoint(config.checkpoint)
    require_finite_weights(checkpoint, config.checkpoint)
    store = FeatureStore.open(config.features)
    corpus = trained_corpus(checkpoint, store, config.checkpoint, progress)
    check_compatible(checkpoint, store, corpus, config.checkpoint)
    rows = split_rows(corpus, store, config.split)
    if len(rows) == 0:
        raise CaptionerError(
            f"{store.path}: no {config.split!r} images with features "
            f"(splits in this store: {', '.join(_split_counts(store)) or 'none'})"
        )
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device, checkpoint.decoder_config.model)
    if progress:
        write_line(precision.describe())
    if resolved_implementation(config.metrics) == COCO:
        start_meteor()  # its Java process loads while the split is decoded
    decoder = checkpoint.build_decoder(device)
    regions = store.grid[0] * store.grid[1]
    native_note = load_native_attention(decoder, regions, device) if config.native_attention else ""
    with precision.autocast():
        captions = decode_rows(
            decoder, store, rows, config.decoding, config.batch_size, device, progress
        )

    ids = store.image_ids()
    references = {
        ids[row]: [c.raw for c in captions] for row, captions in corpus.references(rows).items()
    }
    texts = {
        ids[row]: " ".join(c.words(checkpoint.vocabulary))
        for row, c in zip(rows, captions, strict=True)
    }
    scored = [image for image in texts if references[image]]
    if not scored:
        raise CaptionerError(f"{store.path}: the {config.split!r} images have no captions to score")
    report = score_captions(
        {i: references[i] for i in scored}, {i: texts[i] for i in scored}, config.metrics, progress
    )
    notes = [native_note] if native_note else []
    if len(scored) < len(texts):
        notes.append(f"{len(texts) - len(scored)} images without reference captions not scored")

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    log_probs = {ids[row]: c.log_prob for row, c in zip(rows, captions, strict=True)}
    _write_captions_csv(out / "captions.csv", texts, log_probs, references)
    write_json(
        out / "results.json", [{"image_id": _coco_id(i), "caption": texts[i]} for i in texts]
    )
    summary = {
        **report.to_dict(),
        "checkpoint": str(config.checkpoint),
        "features": str(store.path),
        "split": config.split,
        "decoding": asdict(config.decoding),
        "precision": precision.dtype,
        "notes": report.notes + notes,
    }
    write_json(out / "metrics.json", summary)
    figures = 0
    if config.visualize:
        figures, figure_notes = _attention_figures(
            out / "attention", checkpoint, store, corpus, config, rows, captions
        )
        notes += figure_notes
    page = _evaluation_page(
        config, checkpoint, store, corpus, rows, captions, references, report, notes
    )
    write_report(out / REPORT_NAME, page, progress)
    return EvaluationResult(report, out, len(rows), figures, notes)


def _evaluation_page(
    config: EvaluateConfig,
    checkpoint: Checkpoint,
    store: FeatureStore,
    corpus: Corpus,
    rows: np.ndarray,
    captions: list[GeneratedCaption],
    references: Mapping[str, list[str]],
    report: MetricsReport,
    notes: list[str],
) -> ReportPage:
    """report.html's content: the scores, where they came from, and a card per image."""
    ids = store.image_ids()
    root, why_not = image_root(config.images, store.attrs.get("images_root"))
    cards = [
        Card(
            ids[row],
            " ".join(caption.words(checkpoint.vocabulary)),
            picture=root / corpus.images[row].path if root else None,
            missing=why_not,
            references=references[ids[row]],
            scores=report.per_image.get(ids[row], {}),
            words=caption.words(checkpoint.vocabulary),
            attention=caption.attention,
        )
        for row, caption in zip(rows, captions, strict=True)
    ]
    encoder, settings, model = store.encoder_config, store.settings, checkpoint.decoder_config.model
    details = [
        ("checkpoint", f"{config.checkpoint} ({model})"),
        ("features", f"{store.path}, split {config.split!r}"),
        (
            "encoder",
            f"{encoder.name} at {encoder.image_size} px, grid "
            f"{store.grid[0]}x{store.grid[1]}, {store.channels} channels",
        ),
        ("weights", f"{settings.weights_id} (sha256 {settings.weights_checksum[:12]})"),
        ("decoding", describe_config(config.decoding)),
        ("pictures", str(root) if root else why_not),
    ]
    title = f"{model} on the {config.split} split of {store.path.name}"
    return ReportPage(title, cards, details, report, store.grid, notes)


def trained_corpus(
    checkpoint: Checkpoint, store: FeatureStore, path: Path, progress: ShowProgress = False
) -> Corpus:
    """The captions and splits of `store` as the checkpoint was trained with them: the store's
    own, or, on the very store it was trained on, the caption file that replaced them in
    training (``--captions``), joined to the store's images. Refused in one line if that file is
    gone or the corpus differs from the one recorded: its test images might be trained on."""
    same_store = checkpoint.store_fingerprint == store.fingerprint
    captions = checkpoint.training.get("options", {}).get("captions") if same_store else None
    if captions and not Path(captions).is_file():
        raise CaptionerError(
            f"{path}: was trained with the captions and splits of {captions} (--captions), which"
            " is not there; evaluate where that file is, so the test images are the held-out ones"
        )
    corpus = training_corpus(store, Path(captions) if captions else None, progress)
    if same_store and checkpoint.corpus_sha256 not in ("", corpus_digest(corpus)):
        raise CaptionerError(
            f"{path}: the captions or splits of {captions or store.path} differ from those it was"
            " trained with, so its test images may have been trained on; evaluate with the"
            " corpus it was trained on"
        )
    return corpus


def check_compatible(
    checkpoint: Checkpoint, store: FeatureStore, corpus: Corpus, path: Path
) -> None:
    """One-line errors for a checkpoint that cannot caption this store's features meaningfully."""
    recorded, here = checkpoint.weights_checksum, store.settings.weights_checksum
    if recorded and recorded != here:
        raise CaptionerError(
            f"{path}: trained on features of the encoder weights {checkpoint.weights_id}"
            f" (sha256 {recorded[:12]}), but {store.path} was extracted with"
            f" {store.settings.weights_id} (sha256 {here[:12]}); evaluate on a store extracted"
            " with the weights it was trained on"
        )
    decoder = checkpoint.decoder_config
    if decoder.feature_size != store.channels:
        raise CaptionerError(
            f"{path}: the decoder takes {decoder.feature_size}-channel features but {store.path} "
            f"holds {store.channels}-channel features ({store.encoder_config.name}); use a store "
            f"extracted with {checkpoint.encoder_config.name}"
        )
    if checkpoint.store_fingerprint == store.fingerprint:
        return  # the very features it was trained on
    trained, here = checkpoint.encoder_config, store.encoder_config
    if (trained.name, trained.image_size) != (here.name, here.image_size):
        raise CaptionerError(
            f"{path}: trained on {trained.name} features at {trained.image_size} px, but "
            f"{store.path} holds {here.name} features at {here.image_size} px"
        )
    words = checkpoint.vocabulary.words[len(SPECIAL_TOKENS) :]
    seen = {token for caption in corpus.captions for token in caption.tokens}
    coverage = sum(word in seen for word in words) / max(len(words), 1)
    if coverage < MIN_VOCABULARY_COVERAGE:
        raise CaptionerError(
            f"{path}: its vocabulary does not match {store.path}: only {coverage:.0%} of its "
            f"{len(words)} words occur in the store's captions (trained on another dataset?)"
        )


def decode_rows(
    decoder,
    store: FeatureStore,
    rows: np.ndarray,
    decoding: DecodingConfig,
    batch_size: int,
    device: torch.device,
    progress: ShowProgress = False,
) -> list[GeneratedCaption]:
    """Captions for the store `rows` (ascending), decoded `batch_size` images at a time."""
    captions: list[GeneratedCaption] = []
    with progress_bar(progress, "decoding", len(rows), unit="img") as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            features = store.read(decoder.feature_kind, batch)
            features = torch.from_numpy(np.asarray(features, dtype=np.float32)).to(device)
            captions += generate(decoder, features, decoding)
            bar.update(len(batch))
    return captions


def _attention_figures(
    folder: Path,
    checkpoint: Checkpoint,
    store: FeatureStore,
    corpus: Corpus,
    config: EvaluateConfig,
    rows: np.ndarray,
    captions: list[GeneratedCaption],
) -> tuple[int, list[str]]:
    """One PNG per image for the first `config.visualize` images; the photo when it is found."""
    if captions[0].attention is None:
        return 0, [f"{checkpoint.decoder_config.model} has no attention: nothing to visualize"]
    root, why_not = image_root(config.images, store.attrs.get("images_root"))
    notes = [f"{why_not}: attention drawn on the grid only"] if root is None else []
    folder.mkdir(parents=True, exist_ok=True)
    count = min(config.visualize, len(rows))
    for row, caption in zip(rows[:count], captions[:count], strict=True):
        image = None
        if root is not None:
            try:
                image = load_image(Path(root) / corpus.images[row].path)
            except ImageError as error:
                notes.append(f"{corpus.images[row].path}: {error}; grid only")
        name = Path(corpus.images[row].path).stem or str(row)
        visualize.save_attention_figure(
            folder / f"{name}.png",
            caption.words(checkpoint.vocabulary),
            caption.attention,
            store.grid,
            image,
        )
    return count, notes


def _write_captions_csv(
    path: Path,
    texts: Mapping[str, str],
    log_probs: Mapping[str, float],
    references: Mapping[str, list[str]],
) -> None:
    def write(file) -> None:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["image_id", "caption", "log_prob", "references"])
        for image, text in texts.items():
            joined = REFERENCE_SEPARATOR.join(" ".join(r.split()) for r in references[image])
            cells = [image, text, f"{log_probs[image]:.4f}", joined]
            writer.writerow([spreadsheet_safe(cell) for cell in cells])

    with atomic_file(path, "w", encoding="utf-8", newline="") as file:
        write(file)


def _coco_id(image_id: str) -> int | str:
    """COCO's results format wants its integer image ids as numbers."""
    return int(image_id) if image_id.isdigit() else image_id


def _split_counts(store: FeatureStore) -> list[str]:
    counts = {split: len(store.split_indices(split)) for split in store.attrs["split_names"]}
    return [f"{split} {n}" for split, n in counts.items() if n]
