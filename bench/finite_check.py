"""What refusing NaN and inf costs a training step: `non_finite_rows` (the exponent-bit test that
FeatureStore.read runs on every map it hands to a decoder) over one step's maps, against
np.isfinite on the same maps (the baseline), and both against the Show-Attend-and-Tell training
step they feed (train_decoder.py's defaults: 16 images x 5 captions, sizes 512, 14x14x2048 float16
maps, label smoothing, the attention penalty, fused Adam, the compiled attention scores where they
build). The timings alternate, and the medians are printed with the check's share of the step.

    python bench/finite_check.py [--repeats 7] [--images 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.models import DecoderConfig, build_decoder, load_native_attention  # noqa: E402
from captioner.store import non_finite_rows  # noqa: E402
from captioner.text import END_ID, START_ID  # noqa: E402


def seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--vocabulary", type=int, default=2539, help="Flickr8k's at min count 5")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(args.images, 196, 2048)).astype(np.float16)

    decoder = build_decoder(DecoderConfig("show-attend-tell", args.vocabulary, 2048, 512, 512, 512))
    note = load_native_attention(decoder, 196, torch.device("cpu"))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=4e-4, fused=True)
    count = args.images * args.captions_per_image
    lengths = torch.from_numpy(np.clip(rng.normal(13.8, 3.8, count).round(), 3, 22)).long()
    captions = torch.randint(4, args.vocabulary, (count, int(lengths.max())))
    captions[:, 0] = START_ID
    captions[torch.arange(count), lengths - 1] = END_ID
    image_index = torch.arange(args.images).repeat_interleave(args.captions_per_image)

    def step() -> None:
        features = torch.from_numpy(maps).float()
        loss = decoder.training_loss(features, image_index, captions, lengths, 0.1, 1.0).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    timings: dict[str, list[float]] = {"step": [], "non_finite_rows": [], "np.isfinite": []}
    for _ in range(args.repeats):
        timings["step"].append(seconds(step))
        timings["non_finite_rows"].append(seconds(lambda: non_finite_rows(maps)))
        timings["np.isfinite"].append(seconds(lambda: np.isfinite(maps).all(axis=(1, 2))))
    median = {name: statistics.median(values) for name, values in timings.items()}
    print(f"{args.images} maps of 14x14x2048 float16, {count} captions; {note or 'PyTorch ops'}")
    print(f"training step    {1000 * median['step']:8.1f} ms")
    for name in ("non_finite_rows", "np.isfinite"):
        share = 100 * median[name] / median["step"]
        print(f"{name:16s} {1000 * median[name]:8.2f} ms  ({share:.2f} % of the step)")
    print(
        f"np.isfinite / non_finite_rows: {median['np.isfinite'] / median['non_finite_rows']:.1f}x"
    )


if __name__ == "__main__":
    main()
