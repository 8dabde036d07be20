"""Decoding image files into RGB pictures and batches of tensors, with failures kept as data.

A dataset of real photos always holds a few broken files. They must not stop a long run nor be
stored as if they were pictures: every failure travels with the batch as ``(index, reason)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset


class ImageError(Exception):
    """A file that cannot be used as a picture; ``str(error)`` is the reason."""


def load_image(path: Path) -> Image.Image:
    """The picture in `path` as RGB, upright (EXIF orientation applied), fully decoded.

    Grayscale, CMYK, palette and alpha pictures are converted to RGB (alpha is composited onto
    white, as a viewer shows it). Zero-byte, truncated and non-image files raise ImageError.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow warns about huge or odd files; a broken file is reported through ImageError.
            warnings.simplefilter("ignore")
            with Image.open(path) as opened:
                opened.load()  # decode now: truncated data fails here, not later in a worker
                rgb = _to_rgb(ImageOps.exif_transpose(opened))
                # Closing `opened` frees its pixels, so never hand it out itself.
                return rgb.copy() if rgb is opened else rgb
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image file Pillow can read") from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageError(f"cannot decode image: {error}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        # Palette images may carry transparency; go through RGBA so it is composited below.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping everything to white.
        return image.point(lambda value: value / 256).convert("L").convert("RGB")
    return image.convert("RGB")


class ImageDataset(Dataset):
    """Item i is ``(i, tensor, None)`` for a good picture or ``(i, None, reason)`` for a bad one.

    Decoding and resizing run in DataLoader workers, so `transform` must be picklable.
    """

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]):
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(load_image(self.paths[index])), None
        except ImageError as error:
            return index, None, str(error)


def collate_images(
    items: Sequence[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """``(indices, images, good_indices, failures)`` of a batch.

    `indices` are all dataset indices of the batch, `images` (G, 3, S, S) holds the good pictures
    in the order of `good_indices`, and `failures` lists ``(index, reason)``. When no picture in
    the batch is good, `images` is an empty tensor.
    """
    indices = torch.tensor([index for index, _, _ in items], dtype=torch.long)
    good = [(index, tensor) for index, tensor, _ in items if tensor is not None]
    failures = [(index, reason) for index, tensor, reason in items if tensor is None]
    good_indices = torch.tensor([index for index, _ in good], dtype=torch.long)
    images = torch.stack([tensor for _, tensor in good]) if good else torch.empty(0)
    return indices, images, good_indices, failures
