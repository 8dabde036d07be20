"""`captioner synth`: the synthetic shapes dataset."""

from collections import Counter
from pathlib import Path

import click

from captioner.synthetic import split_of, write_synthetic_dataset, write_unlabelled_images


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/shapes"),
              show_default=True, help="Dataset folder (caption file + images/).")
@click.option("--images", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=96, show_default=True)
@click.option("--captions-per-image", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--unlabelled", is_flag=True,
              help="Write only fresh images (scene_NNNNN.jpg) to caption, no caption file.")
@click.option("--overwrite", is_flag=True, help="Replace a dataset made with other parameters.")
def synth(out: Path, images: int, seed: int, image_size: int, captions_per_image: int,
          unlabelled: bool, overwrite: bool) -> None:
    """Render a captioning dataset of shapes, in the Karpathy split JSON format.

    Each image holds one to three objects; its reference captions say what they are and where
    they lie ("two green triangles above a yellow star"). The same seed gives the same images.
    """
    if unlabelled:
        paths = write_unlabelled_images(out, images, seed, image_size, progress=True)
        click.echo(f"{len(paths)} unlabelled images in {out}")
        return
    caption_file = write_synthetic_dataset(
        out, images, seed, image_size, captions_per_image, overwrite=overwrite, progress=True
    )
    splits = Counter(split_of(index) for index in range(images))
    counts = ", ".join(f"{splits[name]} {name}" for name in ("train", "val", "test"))
    click.echo(f"{caption_file}: {images} images ({counts}), {captions_per_image} captions each")
