"""`captioner inspect`: read a caption dataset and show whether it can be trusted."""

from __future__ import annotations

import json
from pathlib import Path

import click

from captioner.cli.options import PATH, path_option, progress_option
from captioner.corpus_stats import CorpusStats, corpus_stats
from captioner.progress import Progress
from captioner.readers import FORMATS, read_corpus
from captioner.text import SPECIAL_TOKENS


@click.command("inspect")
@click.argument("captions", nargs=-1, required=True, type=PATH)
@path_option(
    "--images",
    help="Image folder: count captions whose image file is missing.",
)
@path_option(
    "--splits",
    "splits_dir",
    help="Folder with *trainImages.txt, *devImages.txt, *testImages.txt; they decide every split.",
)
@click.option(
    "--format", "format_", type=click.Choice(FORMATS), help="Skip detection from the content."
)
@click.option(
    "--min-count",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Vocabulary: keep words seen this often in the train split.",
)
@click.option("--keep-restval", is_flag=True, help="Keep Karpathy's restval apart from train.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@progress_option
def inspect(
    captions: tuple[Path, ...],
    images: Path | None,
    splits_dir: Path | None,
    format_: str | None,
    min_count: int,
    keep_restval: bool,
    as_json: bool,
    progress: Progress,
) -> None:
    """Read CAPTIONS (one or more files of one format) and report what is in them."""
    corpus = read_corpus(list(captions), format_, splits_dir, keep_restval, progress)
    stats = corpus_stats(corpus, min_count, images, progress=progress)
    click.echo(json.dumps(stats.to_dict(), ensure_ascii=False) if as_json else describe(stats))


def describe(stats: CorpusStats) -> str:
    def counts(mapping: dict[str, int]) -> str:
        return ", ".join(f"{name} {n}" for name, n in mapping.items())

    per_image = stats.captions_per_image
    lengths = stats.caption_length
    lines = [
        f"format:      {stats.format} ({', '.join(stats.sources)})",
        f"splits:      {stats.split_rule}",
        f"images:      {stats.images} ({counts(stats.splits)})",
        f"captions:    {stats.captions} ({counts(stats.captions_per_split)})",
        f"per image:   min {per_image['min']}, mean {per_image['mean']}, max {per_image['max']}",
        f"images without captions: {stats.images_without_captions}",
    ]
    if stats.missing is not None:
        example = f"; e.g. {', '.join(stats.missing.examples)}" if stats.missing.examples else ""
        lines.append(
            f"missing on disk: {stats.missing.captions} captions of "
            f"{stats.missing.images} images{example}"
        )
    lines.append(f"skipped:     {stats.skipped} lines")
    lines += [f"  {n:>6}  {reason}" for reason, n in stats.skipped_by_reason.items()]
    lines += [f"  e.g. {example}" for example in stats.skipped_examples]
    lines += [
        f"vocabulary:  {stats.vocab_size} words (train split, min count {stats.min_count}, "
        f"incl. {len(SPECIAL_TOKENS)} special tokens)",
        f"caption length (tokens): p50 {lengths['p50']}, p90 {lengths['p90']}, "
        f"p99 {lengths['p99']}, max {lengths['max']}",
    ]
    return "\n".join(lines)
