"""Captioning image files end to end: files, folders and globs -> CNN -> decoder -> CSV or JSONL.

Pictures are decoded in DataLoader workers; the main thread runs the encoder on whole batches
while a second thread runs the batched decoding of the batch before. Every input file gets
exactly one row (``path, caption, log_prob, error``, the path absolute, so that it names the
file whatever folder a re-run starts in); a file that cannot be read gets an empty caption and
its reason. The output (captioner.inference.caption_output) is written batch by batch and
resumed by a re-run, and holds one model's captions. With `html`, the whole output is also shown
as a page of cards (captioner.inference.report): each picture with its caption, sortable by
log-probability, under the model that made them.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from captioner.checkpoint import Checkpoint, load_checkpoint, require_finite_weights
from captioner.devices import default_workers, resolve_device
from captioner.encoder import EncoderConfig, FrozenEncoder, build_encoder, image_transform
from captioner.errors import CaptionerError
from captioner.files import require_writable_file
from captioner.images import ImageDataset, collate_images
from captioner.inference.caption_output import (
    OUTPUT_FORMATS,
    CaptionModel,
    CaptionOutput,
    CaptionRow,
    path_key,
)
from captioner.inference.report import Card, ReportPage, write_report
from captioner.models.decode import DecodingConfig, GeneratedCaption, generate
from captioner.option_checks import at_least, check_options, one_of
from captioner.precision import ENCODER, PRECISIONS, describe_precisions, resolve_precision
from captioner.preemption import StopRequest
from captioner.progress import ShowProgress
from captioner.progress import bar as progress_bar
from captioner.progress import write as write_line
from captioner.readers.builder import IMAGE_SUFFIXES

# What a folder scan takes for a picture: the suffixes caption files name, and Netpbm's.
FOLDER_IMAGE_SUFFIXES = frozenset((*IMAGE_SUFFIXES, ".ppm", ".pgm", ".pbm"))


@dataclass
class CaptionConfig:
    inputs: Sequence[str | Path]  # files, folders and glob patterns
    checkpoint: Path
    out: Path
    format: str = "csv"  # "csv" | "jsonl"
    recursive: bool = False
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    device: str = "auto"
    precision: str = "auto"  # "auto" | "float32" | "bfloat16" (captioner.precision)
    batch_size: int = 32
    workers: int = default_workers(2)
    weights: str | None = None  # a local encoder weights file instead of the checkpoint's record
    allow_other_weights: bool = False  # caption with weights the decoder was not trained on
    html: Path | None = None  # also write a page of the output's pictures and captions here


@dataclass
class CaptionSummary:
    out: Path
    files: int  # input files found
    skipped: int  # already in the output from an earlier run
    captioned: int
    failed: int
    seconds: float  # the whole call
    stopped: str = ""  # the signal (SIGTERM, SIGINT) that ended the run early, if one did
    startup_seconds: float = 0.0  # of which loading the checkpoint and building the models
    precision: str = ""  # the precision line of the run ("" when nothing was left to caption)

    @property
    def images_per_second(self) -> float:
        """Files processed per second once the models are loaded."""
        working = self.seconds - self.startup_seconds
        return (self.captioned + self.failed) / working if working > 0 else 0.0


def caption_images(config: CaptionConfig, progress: ShowProgress = False) -> CaptionSummary:
    """Caption every image file the inputs name; see the module docstring."""
    started = time.perf_counter()
    check_options(
        config,
        {
            "format": one_of(OUTPUT_FORMATS),
            "precision": one_of(PRECISIONS),
            "batch_size": at_least(1),
            "workers": at_least(0),
        },
    )
    files = find_images(config.inputs, config.recursive)
    if not files:
        raise CaptionerError(f"no image files in {', '.join(map(str, config.inputs))}")
    require_writable_file(config.out)
    if config.html is not None:
        require_writable_file(config.html)
    checkpoint, _ = load_checkpoint(config.checkpoint)
    require_finite_weights(checkpoint, config.checkpoint)
    model = CaptionModel.of(config.checkpoint, config.decoding, _other_weights(config))
    output = CaptionOutput(Path(config.out), config.format)
    done = {path_key(Path(path)) for path, *_ in output.resume(model)}
    todo = [path for path in files if path_key(path) not in done]
    summary = CaptionSummary(Path(config.out), len(files), len(files) - len(todo), 0, 0, 0.0)
    if todo:
        encoder_config = recorded_encoder(checkpoint)
        if config.weights is not None:
            encoder_config = replace(encoder_config, weights=str(config.weights))
        device = resolve_device(config.device)
        encoder_precision = resolve_precision(config.precision, device, ENCODER)
        model_name = checkpoint.decoder_config.model
        decoder_precision = resolve_precision(config.precision, device, model_name)
        encoder = build_encoder(encoder_config).to_device(device, encoder_precision)
        if not config.allow_other_weights:
            check_encoder_weights(checkpoint, encoder, config.checkpoint)
        summary.precision = describe_precisions(encoder_precision, decoder_precision)
        if progress:
            write_line(summary.precision)
        decoder = checkpoint.build_decoder(device)
        loader = DataLoader(
            ImageDataset(todo, image_transform(encoder_config)),
            batch_size=config.batch_size,
            num_workers=config.workers,
            collate_fn=collate_images,
            pin_memory=device.type == "cuda",
        )
        summary.startup_seconds = time.perf_counter() - started

        def decode(features: torch.Tensor | None) -> list[GeneratedCaption]:
            if features is None:
                return []
            with decoder_precision.autocast():  # (autocast holds per thread: entered here)
                return generate(decoder, features, config.decoding)

        def write(batch: tuple[Future, torch.Tensor, torch.Tensor, list]) -> None:
            captions, indices, good, failures = batch
            rows = {index: (path_key(todo[index]), "", None, reason) for index, reason in failures}
            for index, caption in zip(good.tolist(), captions.result(), strict=True):
                text = " ".join(caption.words(checkpoint.vocabulary))
                rows[index] = (path_key(todo[index]), text, caption.log_prob, None)
            output.write([rows[index] for index in indices.tolist()])
            summary.captioned += len(good)
            summary.failed += len(failures)
            bar.update(len(indices))

        # The encoder runs here while a second thread decodes the previous batch's features.
        with (
            output,
            progress_bar(progress, "captioning", len(todo), unit="img") as bar,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as decoding,
            StopRequest() as stop,
        ):
            previous = None
            try:
                for indices, images, good, failures in loader:
                    features = _features(encoder, decoder, images, device) if len(good) else None
                    current = (decoding.submit(decode, features), indices, good, failures)
                    if previous is not None:
                        write(previous)
                    previous = current
                    if stop.requested:  # the batch in hand is written below; the rest waits
                        break
            except Exception:
                if not stop.requested:  # (a signal can also end the DataLoader's workers)
                    raise
            if previous is not None:
                write(previous)
        summary.stopped = stop.name
    if config.html is not None:
        write_report(config.html, _gallery(config, output.rows(), model), progress)
    summary.seconds = time.perf_counter() - started
    return summary


def _gallery(config: CaptionConfig, rows: list[CaptionRow], model: CaptionModel) -> ReportPage:
    """Every row of the output (earlier runs' too, all made by `model`) as a card, scored by its
    log-probability."""
    cards = [
        Card(
            path,
            caption,
            picture=Path(path),
            note=error or "",
            scores={} if log_prob is None else {"log-prob": log_prob},
        )
        for path, caption, log_prob, error in rows
    ]
    details = [*model.details(), ("captions", str(config.out))]
    return ReportPage(f"Captions of {len(cards)} images", cards, details)


def _other_weights(config: CaptionConfig) -> str | None:
    """The encoder weights file that may differ from the checkpoint's: the one --weights names
    with --allow-other-weights (without it, other weights are refused)."""
    if config.weights is None or not config.allow_other_weights:
        return None
    return str(config.weights)


def recorded_encoder(checkpoint: Checkpoint) -> EncoderConfig:
    """The encoder the checkpoint's features came from, with "imagenet" pinned to the exact
    torchvision weights recorded ("ResNet152_Weights.IMAGENET1K_V2" -> "IMAGENET1K_V2"), not
    to whatever the installed torchvision's DEFAULT is."""
    config = checkpoint.encoder_config
    if config.weights == "imagenet" and "." in checkpoint.weights_id:
        return replace(config, weights=checkpoint.weights_id.rsplit(".", 1)[1])
    return config


def check_encoder_weights(checkpoint: Checkpoint, encoder: FrozenEncoder, path: Path) -> None:
    """A one-line refusal of encoder weights other than those the decoder was trained on
    (unknown for checkpoints older than format 3, which are not checked)."""
    recorded = checkpoint.weights_checksum
    if recorded and encoder.weights_checksum != recorded:
        raise CaptionerError(
            f"{path}: trained on features of {checkpoint.weights_id} (sha256 {recorded[:12]}),"
            f" but the encoder here has {encoder.weights_id} (sha256"
            f" {encoder.weights_checksum[:12]}); pass --weights with the file it was trained"
            " with, or --allow-other-weights to caption anyway"
        )


@torch.inference_mode()
def _features(encoder, decoder, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """What the decoder reads: region features, or their mean for a pooled-feature decoder
    (as the store's `pooled` is the mean of the float32 map)."""
    features = encoder(images.to(device, non_blocking=True))
    return features.mean(dim=1) if decoder.feature_kind == "pooled" else features


def find_images(inputs: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """The files named, the image files in the folders named (in subfolders too with
    `recursive`), and the files glob patterns match; sorted within each input, each file once.

    Files named explicitly are kept whatever their suffix (a broken one gets an error row);
    folders contribute files with an image suffix, hidden files left out.
    """
    found: list[Path] = []
    seen: set[str] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            matches = [p for p in sorted(path.glob(pattern)) if _is_image_file(p, path)]
        elif path.exists():
            matches = [path]
        elif glob.has_magic(str(item)):
            matches = [Path(p) for p in sorted(glob.glob(str(item), recursive=recursive))]
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise CaptionerError(f"{item}: no file matches this pattern")
        else:
            raise CaptionerError(f"{item}: no such file or folder")
        for match in matches:
            if path_key(match) not in seen:
                seen.add(path_key(match))
                found.append(match)
    return found


def _is_image_file(path: Path, root: Path) -> bool:
    relative = path.relative_to(root).parts
    return (
        path.suffix.lower() in FOLDER_IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in relative)
        and path.is_file()
    )
