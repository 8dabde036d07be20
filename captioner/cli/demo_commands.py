"""`captioner synth` (the synthetic shapes dataset) and `captioner demo` (everything on it)."""

import os
from collections import Counter
from pathlib import Path

import click

from captioner.cli.options import field_option, path_option, progress_option
from captioner.demo import DemoConfig, format_artifacts, format_comparison, run_demo
from captioner.devices import DEVICES
from captioner.encoder import ENCODER_NAMES, EncoderConfig
from captioner.progress import Progress
from captioner.synthetic import split_of, write_synthetic_dataset, write_unlabelled_images

_DEFAULT_ENCODER = DemoConfig().encoder


@click.command()
@path_option(
    "--out",
    default=Path("data/shapes"),
    help="Dataset folder (caption file + images/).",
)
@click.option("--images", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=96, show_default=True)
@click.option("--captions-per-image", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--unlabelled",
    is_flag=True,
    help="Write only fresh images (scene_NNNNN.jpg) to caption, no caption file.",
)
@click.option("--overwrite", is_flag=True, help="Replace a dataset made with other parameters.")
@progress_option
def synth(
    out: Path,
    images: int,
    seed: int,
    image_size: int,
    captions_per_image: int,
    unlabelled: bool,
    overwrite: bool,
    progress: Progress,
) -> None:
    """Render a captioning dataset of shapes, in the Karpathy split JSON format.

    Each image holds one to three objects; its reference captions say what they are and where
    they lie ("two green triangles above a yellow star"). The same seed gives the same images.
    """
    if unlabelled:
        paths = write_unlabelled_images(out, images, seed, image_size, progress)
        click.echo(f"{len(paths)} unlabelled images in {out}")
        return
    caption_file = write_synthetic_dataset(
        out, images, seed, image_size, captions_per_image, overwrite=overwrite, progress=progress
    )
    splits = Counter(split_of(index) for index in range(images))
    counts = ", ".join(f"{splits[name]} {name}" for name in ("train", "val", "test"))
    click.echo(f"{caption_file}: {images} images ({counts}), {captions_per_image} captions each")


@click.command()
@path_option(
    "--root",
    default=Path("."),
    help="Folder under which data/, features/, runs/ and results/ are written.",
)
@field_option(
    DemoConfig,
    "name",
    str,
    "Name of this demo's files; use another to keep runs with other settings.",
)
@field_option(
    DemoConfig,
    "images",
    click.IntRange(min=20),
    "Labelled images to render (80/10/10 train/val/test).",
)
@field_option(DemoConfig, "epochs", click.IntRange(min=1), "Epochs each decoder trains.")
@field_option(
    DemoConfig,
    "scst_epochs",
    click.IntRange(min=0),
    "Epochs of self-critical fine-tuning of the best decoder by validation CIDEr-D (0: none).",
)
@click.option(
    "--encoder",
    "encoder_name",
    type=click.Choice(ENCODER_NAMES),
    default=_DEFAULT_ENCODER.name,
    show_default=True,
)
@click.option(
    "--weights",
    default=_DEFAULT_ENCODER.weights,
    show_default=True,
    help="imagenet (needs internet once), none (seeded random init) or a weights file.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=32),
    default=_DEFAULT_ENCODER.image_size,
    show_default=True,
    help="Encoder input size (the tiny CNN's grid is size / 32).",
)
@field_option(DemoConfig, "device", click.Choice(DEVICES), "Where the CNN and decoders run.")
@progress_option
def demo(encoder_name: str, weights: str, image_size: int, progress: Progress, **options) -> None:
    """Everything end to end on rendered shapes, offline: dataset, features, the three decoders
    trained (and the best one fine-tuned on CIDEr-D) and evaluated side by side, a folder
    captioned to CSV, attention maps, curves.

    A re-run reuses every finished phase.
    """
    config = DemoConfig(encoder=EncoderConfig(encoder_name, weights, image_size), **options)
    result = run_demo(config, say=click.echo, progress=progress)
    click.echo("\nThe decoders on the held-out test images:")
    click.echo(format_comparison(result))
    click.echo(f"\n{result.models[-1]} on fresh images (all rows in the CSV below):")
    for path, caption in result.samples:  # the CSV holds absolute paths; shown from here
        click.echo(f"  {os.path.relpath(path)}: {caption}")
    phases = ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in result.seconds.items())
    click.echo(f"\nTime: {phases}.")
    click.echo("Artifacts:")
    click.echo(format_artifacts(result))
    click.echo(f"\nOpen in a browser, image by image: {result.report}")
