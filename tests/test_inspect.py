"""`captioner inspect`: the report a user reads before spending GPU hours."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from captioner.cli import main


def make_dataset(folder: Path) -> tuple[Path, Path]:
    images = folder / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (images / name).write_bytes(b"not decoded by inspect")
    rows = [
        "image,caption,split",
        'a.jpg,"A dog, brown",train',
        "a.jpg,a dog runs,train",
        "b.jpg,a cat,train",
        "c.jpg,a dog sleeps on a very long sofa,test",
        "oops,a bird,val",
    ]
    captions = folder / "mine.csv"
    captions.write_text("\r\n".join(rows) + "\r\n")
    return captions, images


def test_inspect_json(tmp_path: Path) -> None:
    captions, images = make_dataset(tmp_path)
    result = CliRunner().invoke(
        main, ["inspect", str(captions), "--images", str(images), "--min-count", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "csv"
    assert report["images"] == 3
    assert report["captions"] == 4
    assert report["splits"] == {"train": 2, "test": 1}
    assert report["skipped"] == 1
    assert report["skipped_by_reason"] == {"not an image file name": 1}
    assert report["vocab_size"] == 4 + 2  # specials + "a", "dog" (train split, seen twice)
    assert report["captions_per_image"] == {"min": 1, "mean": 1.33, "max": 2}
    assert report["missing"] == {"images": 1, "captions": 1, "examples": ["c.jpg"]}
    assert report["caption_length"]["max"] == 8
    assert report["images_without_captions"] == 0


def test_inspect_text_report(tmp_path: Path) -> None:
    captions, images = make_dataset(tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(captions), "--images", str(images)])
    assert result.exit_code == 0, result.output
    assert "images:      3 (train 2, test 1)" in result.output
    assert "missing on disk: 1 captions of 1 images; e.g. c.jpg" in result.output
    assert "not an image file name" in result.output
    assert "mine.csv:6: not an image file name" in result.output
