"""Model FLOPs utilization (MFU) of a training step, for every decoder, in one run.

For each decoder at its default sizes (train_decoder.py's), one training step as the training loop
runs it (the loss of a batch of 16 images x 5 captions, backward, fused Adam) on Flickr8k-shaped
input: ResNet-152's 14x14x2048 maps, caption lengths and vocabulary size from the real Flickr8k
captions where ../shared/fixtures is present. The step's matrix FLOPs are counted once with
`torch.utils.flop_counter.FlopCounterMode` (matrix products and attention, forward and backward;
the compiled attention scores' tanh loop is not a matrix product and is not counted); MFU is those
FLOPs per second of the median step over the float32 rate of a large matrix product (2048 x 2048)
measured in the same run on the same threads, as nanoGPT reports it. Steps of the decoders
alternate, so load drift on a shared machine hits all of them.

    python bench/mfu.py [--device cpu|cuda] [--repeats 5] [--models show-tell,transformer]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from attention_step import caption_shapes, random_captions
from machine import describe_machine
from torch.utils.flop_counter import FlopCounterMode

from captioner.devices import resolve_device
from captioner.models import DECODERS, build_decoder, load_native_attention
from captioner.training.config import TrainConfig, checked_config, decoder_config

IMAGES, CAPTIONS_PER_IMAGE = 16, 5  # train_decoder.py's default batch of 80 captions
GRID, CHANNELS = 14, 2048  # ResNet-152 at 448 px
MATMUL_SIZE = 2048


def matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of a MATMUL_SIZE^2 matrix product, the median of `repeats` timings."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        _synchronize(device)
        times.append((time.perf_counter() - started) / 4)
    return 2 * MATMUL_SIZE**3 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default=",".join(DECODERS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(describe_machine())
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)

    lengths, vocab_size, source = caption_shapes(IMAGES * CAPTIONS_PER_IMAGE, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    captions, lengths = random_captions(lengths, vocab_size, generator)
    captions, lengths = captions.to(device), lengths.to(device)
    image_index = torch.arange(IMAGES, device=device).repeat_interleave(CAPTIONS_PER_IMAGE)
    spatial = torch.randn(IMAGES, GRID * GRID, CHANNELS, device=device).relu_()
    print(
        f"batch {IMAGES} images x {CAPTIONS_PER_IMAGE} captions, {GRID}x{GRID}x{CHANNELS} maps, "
        f"{source}: vocabulary {vocab_size}; {device}, {torch.get_num_threads()} threads"
    )

    steps, flops, notes = {}, {}, {}
    for model in args.models.split(","):
        config = checked_config(TrainConfig(features=Path("-"), out=Path("-"), model=model))
        sizes = decoder_config(config, vocab_size, CHANNELS, (GRID, GRID))
        decoder = build_decoder(sizes).to(device).train()
        notes[model] = load_native_attention(decoder, GRID * GRID, device)
        features = spatial if decoder.feature_kind == "spatial" else spatial.mean(1)
        optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-4, fused=True)

        def step(decoder=decoder, features=features, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            output = decoder.training_loss(features, image_index, captions, lengths, 0.1)
            output.loss.backward()
            optimizer.step()

        with FlopCounterMode(display=False) as counter:
            step()
        flops[model] = counter.get_total_flops()
        steps[model] = step

    times: dict[str, list[float]] = {model: [] for model in steps}
    peaks = [matmul_rate(device, torch.float32, 3)]
    for _ in range(args.repeats):
        for model, step in steps.items():
            _synchronize(device)
            started = time.perf_counter()
            step()
            _synchronize(device)
            times[model].append(time.perf_counter() - started)
        peaks.append(matmul_rate(device, torch.float32, 3))
    peak = statistics.median(peaks)
    print(f"float32 {MATMUL_SIZE}x{MATMUL_SIZE} matrix product: {peak / 1e9:.0f} GFLOP/s (median)")
    for model in steps:
        seconds = statistics.median(times[model])
        achieved = flops[model] / seconds
        print(
            f"{model:>17}: {seconds * 1e3:7.1f} ms a step, "
            f"{IMAGES * CAPTIONS_PER_IMAGE / seconds:6.1f} captions/s, "
            f"{flops[model] / 1e9:6.1f} GFLOP a step, {achieved / 1e9:5.0f} GFLOP/s, "
            f"MFU {achieved / peak:.2f} (median of {args.repeats})"
        )
        if notes[model]:
            print(f"{'':>19}{notes[model]}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
