"""`captioner evaluate`, `captioner score` and `captioner caption`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import click

from captioner.cli.options import (
    apply_options,
    features_options,
    field_option,
    path_option,
    precision_option,
    progress_option,
)
from captioner.devices import DEVICES
from captioner.inference.caption import OUTPUT_FORMATS, CaptionConfig, caption_images
from captioner.inference.evaluate import EvaluateConfig, evaluate
from captioner.inference.report import REPORT_NAME
from captioner.inference.score import ScoreConfig, score_predictions
from captioner.metrics import IMPLEMENTATIONS
from captioner.models.decode import STRATEGIES, DecodingConfig
from captioner.object_store import store_location
from captioner.progress import Progress
from captioner.readers import FORMATS as CAPTION_FORMATS


def decoding_options(command: Callable) -> Callable:
    """The decoding options every command that generates captions takes (DecodingConfig's)."""

    def option(name: str, kind: click.ParamType | type, help: str = "") -> Callable:
        return field_option(DecodingConfig, name, kind, help)

    return apply_options(
        command,
        [
            option("strategy", click.Choice(STRATEGIES)),
            option("beam_size", click.IntRange(min=1)),
            option("max_length", click.IntRange(min=1), "Most words in a caption."),
            option("min_length", click.IntRange(min=0), "Fewest words before the end token."),
            option(
                "length_penalty",
                float,
                "Beam score = log-prob / length ** penalty (>1 favours longer captions).",
            ),
            option(
                "no_repeat_ngram_size",
                click.IntRange(min=0),
                "Never repeat an n-gram of this size (0: allow).",
            ),
            option("temperature", click.FloatRange(min=0, min_open=True), "Sampling only."),
            option(
                "top_k",
                click.IntRange(min=0),
                "Sampling only: draw from the k likeliest words (0: all).",
            ),
            option("seed", int, "Sampling only."),
        ],
    )


def _decoding(options: dict) -> DecodingConfig:
    names = [field.name for field in dataclasses.fields(DecodingConfig)]
    try:
        return DecodingConfig(**{name: options.pop(name) for name in names})
    except ValueError as error:
        raise click.UsageError(str(error)) from None


_metrics_option = click.option(
    "--metrics",
    default="auto",
    show_default=True,
    type=click.Choice(IMPLEMENTATIONS),
    help="auto: coco-caption when Java is found, else the labelled NLTK fallback.",
)


@click.command("evaluate")
@path_option("--checkpoint", required=True)
@features_options("STORE.zarr, or s3://BUCKET/STORE.zarr")
@field_option(EvaluateConfig, "split", str, "The split to caption and score.")
@path_option("--out", required=True, help="Results folder.")
@decoding_options
@field_option(EvaluateConfig, "batch_size", click.IntRange(min=1), "Images decoded at once.")
@field_option(EvaluateConfig, "device", click.Choice(DEVICES), "Where the decoder runs.")
@precision_option(EvaluateConfig)
@_metrics_option
@field_option(
    EvaluateConfig,
    "visualize",
    click.IntRange(min=0),
    "Attention figures (one PNG per image) for the first N images.",
)
@path_option(
    "--images",
    help="Image folder for the figures (default: the one the store was extracted from).",
)
@click.option(
    "--native-attention/--no-native-attention",
    default=EvaluateConfig.native_attention,
    show_default=True,
    help="Attention model on a CPU: the attention scores as a compiled C loop, as in training.",
)
@progress_option
def evaluate_command(progress: Progress, **options) -> None:
    """Caption a split of a feature store and report BLEU-1..4, METEOR, ROUGE-L, CIDEr-D."""
    decoding = _decoding(options)
    options["features"] = store_location(
        options["features"], options.pop("storage_options"), options.pop("cache")
    )
    result = evaluate(EvaluateConfig(decoding=decoding, **options), progress)
    click.echo(result.report.format_table())
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {result.out}/metrics.json, captions.csv, results.json")
    if result.figures:
        click.echo(f"wrote {result.figures} attention figures to {result.out}/attention/")
    click.echo(f"report: {result.out / REPORT_NAME}")


@click.command("score")
@path_option(
    "--predictions",
    required=True,
    help="CSV with image and caption columns, or a COCO results JSON.",
)
@path_option(
    "--captions",
    required=True,
    multiple=True,
    help="The reference caption file(s), in any supported format.",
)
@click.option("--split", default="test", show_default=True)
@path_option("--out", required=True, help="Results folder.")
@click.option("--format", "format_", type=click.Choice(CAPTION_FORMATS), help="Caption format.")
@path_option("--splits", "splits_dir", help="Split files.")
@_metrics_option
@path_option(
    "--images",
    help="Image folder of the caption dataset: the report shows the pictures.",
)
def score_command(
    predictions: Path,
    captions: tuple[Path, ...],
    split: str,
    out: Path,
    format_: str | None,
    splits_dir: Path | None,
    metrics: str,
    images: Path | None,
) -> None:
    """Score any system's captions against a caption dataset, with the same metrics."""
    config = ScoreConfig(
        predictions, list(captions), out, split, format_, splits_dir, metrics, images
    )
    result = score_predictions(config)
    click.echo(result.report.format_table())
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {result.out}/metrics.json\nreport: {result.out / REPORT_NAME}")


@click.command("caption")
@click.argument("inputs", nargs=-1, required=True)
@path_option("--checkpoint", required=True)
@path_option("--out", required=True, help="CSV or JSONL file.")
@click.option(
    "--format", "format_", default="csv", show_default=True, type=click.Choice(OUTPUT_FORMATS)
)
@click.option("--recursive", is_flag=True, help="Look into subfolders too.")
@decoding_options
@field_option(CaptionConfig, "device", click.Choice(DEVICES), "Where the CNN and decoder run.")
@precision_option(CaptionConfig)
@field_option(CaptionConfig, "batch_size", click.IntRange(min=1), "Pictures per batch.")
@field_option(
    CaptionConfig, "workers", click.IntRange(min=0), "DataLoader processes that decode pictures."
)
@path_option(
    "--weights",
    help="Local encoder weights file (default: the weights the checkpoint records).",
)
@click.option(
    "--allow-other-weights",
    is_flag=True,
    help="Caption even with encoder weights other than those the decoder was trained on.",
)
@path_option(
    "--html",
    help="Also write a page (PATH.html, pictures in PATH_files/) of every image and its caption.",
)
@progress_option
def caption_command(inputs: tuple[str, ...], format_: str, progress: Progress, **options) -> None:
    """Caption image files, folders and globs into a CSV (path,caption,log_prob,error).

    Re-running with the same --out skips the files it already holds; an --out whose captions
    another checkpoint or other decoding options made is refused (one output, one model).
    """
    decoding = _decoding(options)
    config = CaptionConfig(inputs=list(inputs), format=format_, decoding=decoding, **options)
    summary = caption_images(config, progress)
    rate = f"; {summary.images_per_second:.1f} images/s" if summary.captioned else ""
    same = " (by this checkpoint and decoding)" if summary.skipped else ""
    click.echo(
        f"{summary.files} files: {summary.captioned} captioned, {summary.failed} unreadable, "
        f"{summary.skipped} already in {summary.out}{same}{rate}"
    )
    if summary.precision:
        click.echo(summary.precision)
    if config.html is not None:
        click.echo(f"report: {config.html}")
    if summary.stopped:
        click.echo(
            f"stopped by {summary.stopped} after the batch in hand: run the same command again"
            " to caption the rest"
        )
