"""Write the synthetic dataset in the Karpathy split JSON format, so the demo exercises the same
reader and extraction path as Flickr8k, plus folders of fresh unlabelled scenes to caption.

Image k depends only on (seed, k): a generator seeded from both draws its scene, texture and
captions, so a dataset of 100 images is the first 100 images of a dataset of 10,000. Splits come
from the index too (of every 10 images, 8 train, 1 val, 1 test), so they do not move with N either.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from captioner.errors import CaptionerError
from captioner.files import atomic_file
from captioner.progress import ShowProgress, tracked
from captioner.synthetic.grammar import describe
from captioner.synthetic.render import render_scene
from captioner.synthetic.scene import Scene, sample_scene
from captioner.text import tokenize

CAPTION_FILE = "dataset_shapes.json"
IMAGE_DIR = "images"
FORMAT_VERSION = 1
_UNLABELLED_STREAM = 1  # fresh scenes come from another random stream than the dataset's


def split_of(index: int) -> str:
    """80% train, 10% val, 10% test, interleaved by index."""
    return {8: "val", 9: "test"}.get(index % 10, "train")


def make_scene(seed: int, index: int, image_size: int = 96, captions: int = 5, stream: int = 0):
    """Scene `index` of the dataset with this seed: (scene, image, reference captions)."""
    rng = np.random.default_rng([seed, index, stream])
    scene = sample_scene(rng, image_size)
    image = render_scene(scene, rng)
    return scene, image, describe(scene, rng, captions)


def write_synthetic_dataset(
    out: Path,
    images: int,
    seed: int,
    image_size: int = 96,
    captions_per_image: int = 5,
    overwrite: bool = False,
    progress: ShowProgress = False,
) -> Path:
    """Write `out/dataset_shapes.json` and `out/images/`; return the caption file.

    A finished dataset with the same parameters is reused as it is. One with other parameters is
    refused unless `overwrite`. The caption file is written last, so an interrupted run leaves no
    caption file and is simply redone.
    """
    if images < 1 or image_size < 32 or captions_per_image < 1:
        raise CaptionerError(f"{out}: need images >= 1, image size >= 32, captions per image >= 1")
    out = Path(out)
    caption_file = out / CAPTION_FILE
    parameters = {
        "generator": "captioner.synthetic",
        "version": FORMAT_VERSION,
        "seed": seed,
        "images": images,
        "image_size": image_size,
        "captions_per_image": captions_per_image,
    }
    if caption_file.exists() and not overwrite:
        existing = _read_json(caption_file).get("synthetic")
        if existing == parameters:
            return caption_file
        raise CaptionerError(
            f"{caption_file}: already holds a dataset made with {existing}; "
            "use --overwrite or another --out"
        )
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    records = _records(out, images, seed, image_size, captions_per_image, progress)
    with atomic_file(caption_file) as file:
        _write_streamed(file, {"dataset": "shapes", "synthetic": parameters}, "images", records)
    return caption_file


def _records(
    out: Path,
    images: int,
    seed: int,
    image_size: int,
    captions_per_image: int,
    progress: ShowProgress,
) -> Iterator[dict]:
    """Render and save image after image, yielding each one's record of the caption file."""
    sentence_id = 0
    for index in tracked(range(images), progress, "synth", unit="img"):
        scene, image, captions = make_scene(seed, index, image_size, captions_per_image)
        filename = f"shapes_{index:06d}.jpg"
        _save_image(image, out / IMAGE_DIR / filename)
        sentences = []
        for raw in captions:
            sentences.append(
                {"raw": raw, "tokens": tokenize(raw), "imgid": index, "sentid": sentence_id}
            )
            sentence_id += 1
        yield {
            "filepath": IMAGE_DIR,
            "filename": filename,
            "imgid": index,
            "split": split_of(index),
            "sentids": [s["sentid"] for s in sentences],
            "sentences": sentences,
            "scene": scene.to_dict(),
        }


def _write_streamed(file: BinaryIO, header: dict, key: str, records: Iterator[dict]) -> None:
    """`header` plus `key`: the list of `records`, byte for byte as `json.dumps(..., indent=1)`
    writes that document, but written record by record as they come, so that a dataset of 123k
    images never holds more than one record in memory."""
    placeholder = "the records"
    whole = json.dumps({**header, key: [placeholder]}, indent=1)
    head, tail = whole.split(json.dumps(placeholder))  # head ends in `"images": [` + line break
    file.write(head.encode("utf-8"))
    for number, record in enumerate(records):
        # A record sits two levels deep: two more spaces after each of its line breaks (JSON
        # strings hold no raw line breaks), and records are separated as json.dumps does.
        text = json.dumps(record, indent=1).replace("\n", "\n  ")
        file.write(((",\n  " if number else "") + text).encode("utf-8"))
    file.write(tail.encode("utf-8"))


def write_unlabelled_images(
    out: Path, images: int, seed: int, image_size: int = 96, progress: ShowProgress = False
) -> list[Path]:
    """Fresh scenes (not in the dataset made with the same seed) as `out/scene_NNNNN.jpg`."""
    if images < 1 or image_size < 32:
        raise CaptionerError(f"{out}: need images >= 1 and image size >= 32")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in tracked(range(images), progress, "synth", unit="img"):
        _, image, _ = make_scene(seed, index, image_size, stream=_UNLABELLED_STREAM)
        path = out / f"scene_{index:05d}.jpg"
        _save_image(image, path)
        paths.append(path)
    return paths


def read_scenes(caption_file: Path) -> dict[str, Scene]:
    """The scene behind each image of a synthetic dataset, by file name (for scoring captions)."""
    document = _read_json(caption_file)
    try:
        return {r["filename"]: Scene.from_dict(r["scene"]) for r in document["images"]}
    except (KeyError, TypeError, ValueError) as error:
        raise CaptionerError(f"{caption_file}: not a synthetic dataset ({error})") from None


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError) as error:
        raise CaptionerError(f"{path}: cannot read ({error})") from None
    if not isinstance(document, dict):
        raise CaptionerError(f"{path}: not a JSON object")
    return document


def _save_image(image, path: Path) -> None:
    with atomic_file(path) as file:
        image.save(file, format="JPEG", quality=92)
