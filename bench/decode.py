"""Batched beam search against decoding the same images one at a time, in one run.

Both paths call `beam_search` with the same decoder, features and beam size (an attention
decoder with the compiled attention scores where evaluate.py would load them); the baseline feeds
it one image per call, as a Python loop over images would. The captions must be identical
(asserted). Repetitions alternate between the two so load drift on a shared machine hits both;
prints the median images/s of each and the ratio (the target is >= 10x), and the batched
search's matrix FLOPs an image and per second, which compare decoders of different cost.

    OMP_NUM_THREADS=1 python bench/decode.py --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe_machine  # noqa: E402  (bench/machine.py)

from captioner.devices import resolve_device  # noqa: E402
from captioner.models import DecoderConfig, build_decoder, load_native_attention  # noqa: E402
from captioner.models.decode import DecodingConfig, beam_search  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="show-attend-tell")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=2500, help="Flickr8k at min count 5: ~2.5k")
    parser.add_argument("--grid", type=int, default=7, help="regions per side (7: 224 px)")
    parser.add_argument("--feature-size", type=int, default=512, help="512: ResNet-18/34")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(describe_machine())

    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = DecoderConfig(
        args.model,
        args.vocab,
        args.feature_size,
        args.hidden_size,
        args.hidden_size,
        args.hidden_size,
        dropout=0.0,
    )
    decoder = build_decoder(config).to(device).eval()
    # the compiled attention scores, as evaluate.py loads them (both paths use them)
    native_note = load_native_attention(decoder, args.grid * args.grid, device)
    with torch.no_grad():
        decoder.head[1].weight.mul_(6.0)  # untrained heads are flat; make captions end and differ
    shape = (args.images, args.grid * args.grid, args.feature_size)
    features = torch.randn(shape, device=device)
    if decoder.feature_kind == "pooled":
        features = features.mean(dim=1)
    decoding = DecodingConfig(beam_size=args.beam_size, max_length=args.max_length)

    def batched() -> list:
        return beam_search(decoder, features, decoding)

    def one_at_a_time() -> list:
        return [
            beam_search(decoder, features[i : i + 1], decoding)[0] for i in range(len(features))
        ]

    batched(), one_at_a_time()  # warm-up
    with FlopCounterMode(display=False) as counter:  # matrix FLOPs, as bench/mfu.py counts
        batched()
    flops_per_image = counter.get_total_flops() / args.images
    rates: dict[str, list[float]] = {"batched": [], "one at a time": []}
    for _ in range(args.repeats):
        for name, run in (("batched", batched), ("one at a time", one_at_a_time)):
            _synchronize(device)
            started = time.perf_counter()
            captions = run()
            _synchronize(device)
            rates[name].append(args.images / (time.perf_counter() - started))
            if name == "batched":
                expected = [c.tokens for c in captions]
            else:
                assert [c.tokens for c in captions] == expected, "captions differ"
    lengths = [len(tokens) for tokens in expected]
    print(
        f"{args.model}, {args.images} images, beam {args.beam_size}, max length "
        f"{args.max_length}, vocab {args.vocab}, {args.grid}x{args.grid}x{args.feature_size} "
        f"features, hidden {args.hidden_size}, {device}, {torch.get_num_threads()} threads; "
        f"caption lengths {min(lengths)}-{max(lengths)}; same captions: yes"
    )
    if native_note:
        print(native_note)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in medians.items():
        print(f"{name:>14}: {value:8.1f} images/s (median of {args.repeats})")
    print(f"ratio: {medians['batched'] / medians['one at a time']:.1f}x (target >= 10x)")
    print(
        f"batched: {flops_per_image / 1e9:.2f} GFLOP an image (torch.utils.flop_counter), "
        f"{flops_per_image * medians['batched'] / 1e9:.1f} GFLOP/s"
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
