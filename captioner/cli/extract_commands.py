"""`captioner extract` (phase 1) and `captioner features info`."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from captioner.cli.options import (
    field_option,
    path_option,
    precision_option,
    progress_option,
    storage_options_option,
    store_option,
)
from captioner.devices import DEVICES
from captioner.encoder import ENCODER_NAMES, EncoderConfig, RandomWeightsWarning
from captioner.errors import CaptionerError
from captioner.extraction.extract import ExtractConfig, extract_features
from captioner.extraction.integrity import damaged_shards, has_checksums
from captioner.object_store import store_location
from captioner.progress import Progress, write
from captioner.readers import FORMATS
from captioner.store import (
    COMPRESSIONS,
    DTYPES,
    FeatureStore,
)


def _option(name: str, kind: click.ParamType | type, help: str):
    """An option whose default is ExtractConfig's, so the two can never disagree."""
    return field_option(ExtractConfig, name, kind, help)


@click.command("extract")
@path_option(
    "--captions",
    multiple=True,
    required=True,
    help="Caption file (repeat for datasets split over several files).",
)
@path_option("--images", required=True, help="Image folder.")
@store_option("--out", required=True, help="Store: a folder STORE.zarr, or s3://BUCKET/STORE.zarr.")
@storage_options_option
@click.option("--format", type=click.Choice(FORMATS), help="Skip format detection.")
@path_option(
    "--splits",
    "splits_dir",
    help="Folder with Flickr split files (*trainImages.txt, ...); they decide every split.",
)
@click.option("--keep-restval", is_flag=True, help="Keep Karpathy's restval apart from train.")
@click.option(
    "--encoder", default=EncoderConfig.name, show_default=True, type=click.Choice(ENCODER_NAMES)
)
@click.option(
    "--weights",
    default=EncoderConfig.weights,
    show_default=True,
    help="imagenet (torchvision's DEFAULT weights, downloaded once), a torchvision weights name"
    " (IMAGENET1K_V1), none (random: meaningless captions, for trials) or PATH to a state dict.",
)
@click.option(
    "--image-size",
    default=EncoderConfig.image_size,
    show_default=True,
    type=click.IntRange(min=32),
    help="Pictures are resized to this square; 448 gives ResNets a 14x14 grid.",
)
@click.option("--gpu", is_flag=True, help="Shorthand for --device cuda.")
@_option("device", click.Choice(DEVICES), "Where the CNN runs.")
@precision_option(ExtractConfig)
@_option("batch_size", click.IntRange(min=1), "Pictures per forward pass.")
@_option("workers", click.IntRange(min=0), "DataLoader processes that decode and resize pictures.")
@_option("dtype", click.Choice(DTYPES), "Stored type of the spatial maps.")
@_option(
    "images_per_shard",
    click.IntRange(min=1),
    "Images per shard file: the unit of writing, resuming and fast reading.",
)
@_option(
    "compression",
    click.Choice(COMPRESSIONS),
    "zstd stores ResNet maps ~30% smaller; none reads about twice as fast.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images (trials).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store made differently.")
@click.option(
    "--repair",
    is_flag=True,
    help="Re-extract the shards that `captioner features verify` finds damaged.",
)
@progress_option
def extract(
    captions: tuple[Path, ...],
    progress: Progress,
    encoder: str,
    weights: str,
    image_size: int,
    gpu: bool,
    device: str,
    **options,
) -> None:
    """Run a frozen CNN over the images of a caption dataset into a feature store.

    Interrupted runs resume where they stopped when the same command is run again. Under
    `torchrun --nproc_per_node=K` the ranks share the work.
    """
    if gpu:
        if device not in ("auto", "cuda"):
            raise CaptionerError(f"--gpu contradicts --device {device}")
        device = "cuda"
    encoder_config = EncoderConfig(encoder, weights, image_size)
    options["out"] = store_location(options["out"], options.pop("storage_options"))
    config = ExtractConfig(list(captions), encoder=encoder_config, device=device, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("always", RandomWeightsWarning)
        summary = extract_features(config, progress)
    if summary.is_main_process:
        click.echo(summary.describe())


@click.group("features")
def features() -> None:
    """Look into feature stores."""


@features.command("info")
@click.argument("store")
@storage_options_option
@click.option("--failures", default=20, show_default=True, help="How many failed images to list.")
def info(store: str, storage_options: str | None, failures: int) -> None:
    """Summarize STORE (a folder or s3://...): shape, dtype, counts by status and split, size,
    provenance."""
    opened = FeatureStore.open(store_location(store, storage_options))
    click.echo(opened.describe(max_failures=failures))


@features.command("verify")
@click.argument("store")
@storage_options_option
@progress_option
def verify(store: str, storage_options: str | None, progress: Progress) -> None:
    """Read every chunk of STORE: one line per damaged shard, or per shard whose finished rows
    hold NaN or inf (naming those rows), then an error and exit status 1; or a summary.

    Repair what it finds with the extraction command that made the store plus --repair.
    """
    opened = FeatureStore.open(store_location(store, storage_options))
    shards = -(-opened.num_images // opened.images_per_shard)
    found = 0
    for shard in damaged_shards(opened, progress):
        write(shard.describe(opened))
        found += 1
    if found:
        raise CaptionerError(
            f"{opened.path}: {found} shard{'s are' if found > 1 else ' is'} damaged or holding"
            " NaN or inf (listed above); re-extract them: the extraction command that made the"
            " store, plus --repair"
        )
    how = (
        "every chunk's crc32c checksum matches"
        if has_checksums(opened)
        else "every chunk decompresses (this store predates chunk checksums, so damage that"
        " still decompresses cannot show)"
    ) + ", and every finished image's values are finite"
    click.echo(f"{opened.path}: {shards} shards of spatial and pooled features verified: {how}")
