"""Scoring another system's captions (a CSV or a COCO results JSON) against a caption dataset
with the same metrics as `evaluate`: writes metrics.json and report.html into `out`."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from captioner.corpus import Corpus
from captioner.errors import CaptionerError
from captioner.files import require_writable_folder, spreadsheet_value, write_json
from captioner.inference.report import REPORT_NAME, Card, ReportPage, image_root, write_report
from captioner.metrics import COCO, MetricsReport, check_java, score_captions
from captioner.readers import read_corpus
from captioner.readers.source import Source


@dataclass
class ScoreConfig:
    predictions: Path  # CSV with image (or image_id or path) and caption columns, or COCO JSON
    captions: list[Path]  # the caption dataset, in any format read_corpus reads
    out: Path
    split: str = "test"
    format: str | None = None
    splits_dir: Path | None = None
    metrics: str = "auto"
    images: Path | None = None  # image folder for the report's pictures


@dataclass
class ScoreResult:
    report: MetricsReport
    out: Path
    notes: list[str]


def score_predictions(config: ScoreConfig) -> ScoreResult:
    """Score another system's captions (CSV or COCO results JSON) against a caption dataset."""
    require_writable_folder(config.out)
    if config.metrics == COCO:
        check_java()
    corpus = read_corpus(config.captions, config.format, config.splits_dir)
    rows = corpus.image_indices(config.split)
    if not rows:
        raise CaptionerError(
            f"{config.captions[0]}: no {config.split!r} images "
            f"(splits: {', '.join(sorted({image.split for image in corpus.images}))})"
        )
    predictions = read_predictions(config.predictions)
    matched, notes = _match_predictions(predictions, corpus, rows, config.predictions)
    references = {
        corpus.images[row].id: [c.raw for c in captions]
        for row, captions in corpus.references(matched).items()
    }
    missing_references = [image for image, refs in references.items() if not refs]
    if missing_references:
        raise CaptionerError(
            f"{config.captions[0]}: image {missing_references[0]!r} has no reference captions"
        )
    texts = {corpus.images[row].id: caption for row, caption in matched.items()}
    report = score_captions(references, texts, config.metrics)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        **report.to_dict(),
        "predictions": str(config.predictions),
        "captions": [str(path) for path in config.captions],
        "split": config.split,
        "notes": report.notes + notes,
    }
    write_json(out / "metrics.json", summary)
    root, why_not = image_root(config.images, None)
    cards = [
        Card(
            corpus.images[row].id,
            caption,
            picture=root / corpus.images[row].path if root else None,
            missing=why_not,
            references=references[corpus.images[row].id],
            scores=report.per_image[corpus.images[row].id],
        )
        for row, caption in matched.items()
    ]
    details = [
        ("predictions", str(config.predictions)),
        ("references", f"{', '.join(map(str, config.captions))}, split {config.split!r}"),
        ("pictures", str(root) if root else why_not),
    ]
    title = f"{Path(config.predictions).name} on the {config.split} split"
    write_report(out / REPORT_NAME, ReportPage(title, cards, details, report, notes=notes))
    return ScoreResult(report, out, notes)


def read_predictions(path: Path) -> list[tuple[str, str, int]]:
    """(image key, caption, line or entry number) from a CSV or a COCO results JSON file."""
    path = Path(path)
    text = Source.load(path).text  # (missing, a folder, empty or not UTF-8: one line)
    if text.lstrip().startswith("["):
        return _json_predictions(path, text)
    return _csv_predictions(path, text)


def _json_predictions(path: Path, text: str) -> list[tuple[str, str, int]]:
    try:
        entries = json.loads(text)
    except ValueError as error:
        raise CaptionerError(f"{path}: not valid JSON ({error})") from None
    predictions = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise CaptionerError(f"{path}: entry {number} lacks image_id or caption")
        predictions.append((str(entry["image_id"]), str(entry["caption"]), number))
    return predictions


def _csv_predictions(path: Path, text: str) -> list[tuple[str, str, int]]:
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    key = next((name for name in ("image", "image_id", "path") if name in columns), None)
    if key is None or "caption" not in columns:
        raise CaptionerError(
            f"{path}: a predictions CSV needs an 'image' (or 'image_id' or 'path') column and a "
            f"'caption' column; found {columns}"
        )
    return [
        (spreadsheet_value(row[key] or ""), spreadsheet_value(row["caption"] or ""), number)
        for number, row in enumerate(reader, start=2)
    ]


def _match_predictions(
    predictions: list[tuple[str, str, int]], corpus: Corpus, rows: list[int], path: Path
) -> tuple[dict[int, str], list[str]]:
    """Corpus row -> predicted caption, matching a prediction's key to an image's id, its path,
    or its file name; notes on what was left out."""
    in_split = set(rows)
    lookup: dict[str, int] = {}
    names: dict[str, list[int]] = {}
    for row, image in enumerate(corpus.images):
        lookup.setdefault(image.id, row)
        lookup.setdefault(image.path, row)
        names.setdefault(Path(image.path).name, []).append(row)
    matched: dict[int, str] = {}
    other_split = unknown = 0
    for key, caption, number in predictions:
        row = lookup.get(key)
        if row is None:
            candidates = names.get(Path(key).name, [])
            row = candidates[0] if len(candidates) == 1 else None
        if row is None:
            unknown += 1
        elif row not in in_split:
            other_split += 1
        elif row in matched:
            raise CaptionerError(f"{path}: line {number}: a second caption for image {key!r}")
        else:
            matched[row] = caption
    if not matched:
        raise CaptionerError(
            f"{path}: none of its {len(predictions)} predictions name an image of that split"
        )
    notes = []
    if len(matched) < len(rows):
        notes.append(f"scored {len(matched)} of {len(rows)} images; the rest have no prediction")
    if other_split:
        notes.append(f"{other_split} predictions for images of other splits ignored")
    if unknown:
        notes.append(f"{unknown} predictions for images not in the dataset ignored")
    return matched, notes
