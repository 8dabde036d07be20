"""Image decoding: broken files become reasons, odd modes become RGB, EXIF orientation applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.encoder import EncoderConfig, image_transform
from captioner.images import ImageDataset, ImageError, collate_images, load_image


def _save(path, mode, size=(8, 6), colour=None, **options):
    Image.new(mode, size, colour).save(path, **options)
    return path


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("empty.jpg", lambda p: p.write_bytes(b""), "empty file"),
        ("notes.jpg", lambda p: p.write_text("not a picture"), "not an image"),
        ("missing.jpg", lambda p: None, "file not found"),
    ],
)
def test_unusable_files_raise_image_error(tmp_path, name, make, reason):
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageError, match=reason):
        load_image(path)


def test_truncated_jpeg_raises_image_error(tmp_path):
    whole = _save(tmp_path / "whole.jpg", "RGB", (64, 64), (200, 10, 10), quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(cut)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("L", 128, (128, 128, 128)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("RGBA", (0, 0, 255, 0), (255, 255, 255)),  # fully transparent shows the white background
        ("I;16", 65535, (255, 255, 255)),
    ],
)
def test_other_modes_become_rgb(tmp_path, mode, colour, expected):
    suffix = ".tiff" if mode in ("CMYK", "I;16") else ".png"
    image = load_image(_save(tmp_path / f"x{suffix}", mode, colour=colour))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == expected


def test_palette_image_with_transparency_becomes_rgb(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (10, 200, 30)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (4, 8)


def test_dataset_and_collate_keep_failures_as_data(tmp_path):
    good = _save(tmp_path / "good.png", "RGB", (10, 12), (1, 2, 3))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    dataset = ImageDataset([bad, good, good], image_transform(EncoderConfig("tiny", "none", 32)))
    indices, images, good_indices, failures = collate_images([dataset[i] for i in range(3)])
    assert indices.tolist() == [0, 1, 2]
    assert good_indices.tolist() == [1, 2]
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert failures == [(0, "empty file (0 bytes)")]
    # the ImageNet normalization is applied: a constant picture is constant per channel
    assert np.allclose(images[0, 0].numpy(), images[0, 0, 0, 0].item(), atol=1e-5)

    _, images, good_indices, failures = collate_images([dataset[0]])
    assert images.numel() == 0 and good_indices.numel() == 0 and len(failures) == 1
