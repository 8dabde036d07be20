"""The machine a benchmark ran on, as bench/RESULTS.md names machines: the CPU model and whether
it has the vector units that set its matrix-product rates (AVX-512, its bfloat16 dot products,
AMX). Every benchmark prints this line first, so a printout says where its figures come from."""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
FEATURES = ("avx512f", "avx512_bf16", "amx_bf16")


def describe_machine() -> str:
    """'machine: AMD EPYC, 2 CPUs; avx512f yes, avx512_bf16 yes, amx_bf16 no' on Linux; the
    processor name alone where /proc/cpuinfo is absent."""
    model, flags = platform.processor() or platform.machine(), None
    if CPUINFO.is_file():
        lines = (line.partition(":") for line in CPUINFO.read_text().splitlines())
        fields = {key.strip(): value.strip() for key, _, value in lines}
        model = fields.get("model name", model)
        flags = set(fields.get("flags", "").split())
    line = f"machine: {model}, {os.cpu_count()} CPUs"
    if flags is not None:
        line += "; " + ", ".join(f"{name} {'yes' if name in flags else 'no'}" for name in FEATURES)
    return line
