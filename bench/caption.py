"""`caption_images` over a folder of photos against the bare encoder forward, in one run.

Ours: the whole `captioner caption` path (JPEG decode + resize in DataLoader workers, the
checkpoint's encoder, batched beam search, rows written as they finish), timed end to end
(start-up included) and after loading the checkpoint and building the models (the steady rate a
long run sees). Baseline: the same encoder's forward over ready-made tensors, same batch size,
device and precision. Both run at each --precision (float32, auto, bfloat16 where the device has
it); repetitions alternate between them. Prints median images/s, each precision's ratio to
float32 and caption / bare forward (the target is >= 0.90). Encoder weights are random (no
downloads here): they cost what trained ones do.

    OMP_NUM_THREADS=1 python bench/caption.py --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import write_photos  # noqa: E402  (bench/extract.py: Flickr-sized JPEGs)
from machine import describe_machine  # noqa: E402  (bench/machine.py)

from captioner.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from captioner.devices import resolve_device  # noqa: E402
from captioner.encoder import EncoderConfig, build_encoder  # noqa: E402
from captioner.inference.caption import CaptionConfig, caption_images  # noqa: E402
from captioner.models import DecoderConfig, build_decoder  # noqa: E402
from captioner.models.decode import DecodingConfig  # noqa: E402
from captioner.precision import (  # noqa: E402
    ENCODER,
    describe_precisions,
    missing_bf16_support,
    resolve_precision,
)
from captioner.text import SPECIAL_TOKENS, Vocabulary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--model", default="show-attend-tell")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=2500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(describe_machine())

    device = resolve_device(args.device)
    encoder_config = EncoderConfig(args.encoder, "none", args.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        encoder = build_encoder(encoder_config)
    precisions = {"float32": "float32", "auto": "auto"}
    if why_not := missing_bf16_support(device):
        print(f"bfloat16 not measured: {why_not}")
    else:
        precisions["bfloat16"] = "bfloat16"
    print(
        describe_precisions(*(resolve_precision("auto", device, w) for w in (ENCODER, args.model)))
    )
    batches = -(-args.images // args.batch_size)
    ready = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

    def bare_forward(precision: str) -> float:
        encoder.to_device(device, resolve_precision(precision, device, ENCODER))
        with torch.inference_mode():
            encoder(ready.to(device))  # warm-up
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(batches):
                encoder(ready.to(device, non_blocking=True))
            _synchronize(device)
        return batches * args.batch_size / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as tmp:
        photos = write_photos(Path(tmp) / "data", args.images) / "images"
        checkpoint = _checkpoint(Path(tmp) / "best.pt", args, encoder_config, encoder)

        def captioning(precision: str, repeat: int) -> tuple[float, float]:
            config = CaptionConfig(
                [photos],
                checkpoint,
                Path(tmp) / f"captions-{precision}-{repeat}.csv",
                decoding=DecodingConfig(beam_size=args.beam_size),
                device=str(device),
                precision=precision,
                batch_size=args.batch_size,
                workers=args.workers,
            )
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                summary = caption_images(config)
            _synchronize(device)
            assert summary.captioned == args.images
            return args.images / (time.perf_counter() - started), summary.images_per_second

        runs = {name: {"bare": [], "caption": [], "steady": []} for name in precisions}
        for repeat in range(args.repeats):
            for name, precision in precisions.items():
                bare = bare_forward(precision)
                end_to_end, steady = captioning(precision, repeat)
                for kind, rate in (("bare", bare), ("caption", end_to_end), ("steady", steady)):
                    runs[name][kind].append(rate)
                print(
                    f"repeat {repeat}, {name}: bare {bare:.2f}, caption {end_to_end:.2f} end to"
                    f" end, {steady:.2f} after loading the models (img/s)"
                )
    medians = {
        name: {kind: statistics.median(rates) for kind, rates in kinds.items()}
        for name, kinds in runs.items()
    }
    print(
        f"{args.encoder} @ {args.image_size} px, {args.model} (vocab {args.vocab}, beam "
        f"{args.beam_size}) on {device}, batch {args.batch_size}, {args.images} images, "
        f"{args.workers} workers, torch threads {torch.get_num_threads()}"
    )
    print(f"images/s, medians of {args.repeats}; each precision's ratio to float32 in brackets")
    print(f"{'precision':10} {'bare':>14} {'caption':>14} {'after load':>14} {'caption/bare':>12}")
    for name, rates in medians.items():
        cells = [
            f"{rates[kind]:7.2f} ({rates[kind] / medians['float32'][kind]:4.2f})"
            for kind in ("bare", "caption", "steady")
        ]
        print(f"{name:10} {' '.join(cells)} {rates['caption'] / rates['bare']:12.3f}")
    print("(target: caption / bare >= 0.90)")


def _checkpoint(path: Path, args, encoder_config: EncoderConfig, encoder) -> Path:
    """An untrained decoder of the usual sizes over this encoder's features."""
    vocabulary = Vocabulary([*SPECIAL_TOKENS, *(f"w{i}" for i in range(args.vocab - 4))])
    config = DecoderConfig(args.model, len(vocabulary), encoder.channels, dropout=0.0)
    torch.manual_seed(0)
    decoder = build_decoder(config)
    checkpoint = Checkpoint(config, decoder.state_dict(), vocabulary, encoder_config, "bench", {})
    save_checkpoint(path, checkpoint)
    return path


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
