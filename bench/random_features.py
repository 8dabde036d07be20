"""What the store keeps of each encoder's maps under `--weights none`: torchvision's random init
(the baseline, what `build_encoder` ran before its random weights were scaled) against
`build_encoder`'s, both seeded alike.

For each encoder: the share of map values that are not finite once cast to the store's dtype, the
share that are zero there, the largest magnitude (float32), and the per-channel std over the
pictures' regions in the stored dtype (median, and the share of channels whose std is 0 or not
finite). Pictures: the Flickr8k fixture images when ../shared/fixtures is there, else generated.

    python bench/random_features.py --image-size 448 --images 2
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.encoder import (  # noqa: E402
    ENCODER_NAMES,
    RANDOM_WEIGHTS_SEED,
    EncoderConfig,
    RandomWeightsWarning,
    _architecture,
    _backbone,
    build_encoder,
    image_transform,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "flickr8k" / "images"


def pictures(count: int) -> list[Image.Image]:
    files = sorted(FIXTURES.glob("*.jpg"))[:count]
    if len(files) == count:
        return [Image.open(path).convert("RGB") for path in files]
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 500)[None, :, None] * np.linspace(0, 1, 375)[:, None, None]
    return [
        Image.fromarray((ramp * rng.integers(60, 255, size=3)).astype(np.uint8))
        for _ in range(count)
    ]


def torchvision_random_trunk(name: str) -> torch.nn.Module:
    """The baseline: the trunk with torchvision's own random init, seeded as build_encoder seeds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return _backbone(name, _architecture(name)).eval()


def describe(maps: torch.Tensor, dtype: torch.dtype) -> str:
    stored = maps.to(dtype).float()
    finite = torch.isfinite(stored)
    std = stored.reshape(-1, stored.shape[-1]).std(0)
    dead = ~torch.isfinite(std) | (std == 0)
    return (
        f"non-finite {100 * (1 - finite.float().mean().item()):6.2f} %"
        f"  zero {100 * (stored == 0).float().mean().item():5.1f} %"
        f"  max |x| {maps.abs().max().item():9.3g}"
        f"  channel std median {std[~dead].median().item() if (~dead).any() else 0.0:8.3g}"
        f"  channels with std 0 or non-finite {100 * dead.float().mean().item():5.1f} %"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", default=",".join(ENCODER_NAMES))
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{args.images} pictures at {args.image_size} px, maps cast to {args.dtype}")
    for name in args.encoders.split(","):
        config = EncoderConfig(name, "none", args.image_size)
        batch = torch.stack([image_transform(config)(p) for p in pictures(args.images)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            ours = build_encoder(config)
        trunks = {"build_encoder": ours.backbone}
        if name != "tiny":  # (captioner's own CNN: no torchvision init to compare with)
            trunks = {"torchvision's init": torchvision_random_trunk(name), **trunks}
        for label, trunk in trunks.items():
            started = time.perf_counter()
            with torch.inference_mode():
                maps = trunk(batch).float().flatten(2).transpose(1, 2)
            seconds = time.perf_counter() - started
            print(f"{name:12s} {label:18s} {describe(maps, dtype)}  ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
