"""The rate of a large matrix product in float32 and in bfloat16 on this machine's CPU threads:
what decides whether bf16 pays here (captioner.precision decides from the CPU's flags; this
shows the rates those flags stand for).

    python bench/matmul.py --size 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe_machine  # noqa: E402  (bench/machine.py)


def gflops(size: int, dtype: torch.dtype, products: int) -> float:
    """GFLOP/s of `products` size x size products in `dtype`, after one warm-up product."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(products):
        a @ b
    return 2 * size**3 * products / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--products", type=int, default=4, help="products timed per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(describe_machine())
    rates: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(args.repeats):  # alternating, so load drift hits both
        for name in rates:
            products = args.products if name == "float32" else max(1, args.products // 4)
            rates[name].append(gflops(args.size, getattr(torch, name), products))
    float32, bfloat16 = (statistics.median(rates[name]) for name in rates)
    print(
        f"{args.size}x{args.size} products on {torch.get_num_threads()} threads, medians of"
        f" {args.repeats}: float32 {float32:.1f} GFLOP/s, bfloat16 {bfloat16:.2f} GFLOP/s"
        f" (bf16 / float32 {bfloat16 / float32:.3f})"
    )


if __name__ == "__main__":
    main()
