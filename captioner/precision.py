"""The precision a command computes in: the `--precision` choices, what "auto" picks for the device
and the work at hand, and the autocast that applies it.

bfloat16 is worth its rounding only where the hardware multiplies it faster than float32:
- CUDA GPUs: tensor cores (the CNN about twice as fast; training and decoding as well).
- CPUs with bf16 matrix units (Intel AMX, `amx_bf16`): a 2048x2048 product at 2,320 GFLOP/s
  against 364 in float32 on two threads, ResNet-152 at 448 px 3.3x as many images/s. There the
  CNN and the Transformer decoder, whose products are large, run in bf16; the LSTM decoders stay
  in float32, because their step's products are small and the casts around them dominate (the
  attention LSTM's training step took 905 ms in bf16 against 685 in float32 on that CPU).
- Other CPUs: `avx512_bf16` alone multiplies bf16 slower than float32 (170 against 310 GFLOP/s),
  and a CPU without bf16 instructions has PyTorch emulate it far slower still (0.70 against 35
  GFLOP/s at 1024x1024 on an AMD EPYC with AVX2), so "auto" stays in float32 there, and
  `bfloat16` is refused on a CPU without bf16 instructions.

The CPU's kind is read from its feature flags (/proc/cpuinfo), not from a probe of both matrix
rates: the flags say the same on every run, cost nothing at start-up and do not depend on what
else the machine is doing, while a probe on a shared machine could pick differently from one run
to the next (and a resumed extraction must compute as its first run did).

The CNN also runs channels-last wherever it runs on CUDA or a CPU, whatever the precision: on a
CPU in float32 that is 1.3x as many images/s on the Xeon with AMX, and 1.06-1.13x in medians on
an AMD EPYC without bf16 (within that shared machine's noise; bench/RESULTS.md [precision]).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.errors import CaptionerError

PRECISIONS = ("auto", "float32", "bfloat16")
ENCODER = "encoder"  # the work of the frozen CNN; decoders are named by their model
CPUINFO = Path("/proc/cpuinfo")
# Whether a kind of work runs faster in bf16 than in float32 on a CPU with bf16 matrix units.
BF16_GAINS_ON_CPU_MATRIX_UNITS = {
    ENCODER: True,  # large convolutions: 3.3x on a Xeon with AMX
    "show-attend-tell": False,  # small products, casts dominate: 905 ms a step in bf16, 685 in fp32
    "show-tell": False,  # the same kind of LSTM step (not measured on its own)
    "transformer": True,  # every word of a batch in one pass of large products (not yet measured)
}
_BF16_INSTRUCTIONS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 flags; "bf16": Arm's Features


@dataclass(frozen=True)
class Precision:
    """How one kind of work computes: in `dtype` ("float32", or under autocast "bfloat16", or
    "float16" on a CUDA GPU without bf16), channels-last or not (the CNN), and why that was
    chosen."""

    dtype: str
    device_type: str  # "cpu", "cuda", "mps"
    reason: str
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context that computes in this precision (none for float32)."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.dtype))

    def summary(self) -> str:
        """'bfloat16 autocast, channels-last (why)': the choice and why, for a run's first lines."""
        how = self.dtype if self.dtype == "float32" else f"{self.dtype} autocast"
        if self.channels_last:
            how += ", channels-last"
        return f"{how} ({self.reason})"

    def describe(self) -> str:
        return f"precision: {self.summary()}"


def describe_precisions(encoder: Precision, decoder: Precision) -> str:
    """One line for a command that runs the CNN and a decoder: one choice, or each one's."""
    if (encoder.dtype, encoder.reason) == (decoder.dtype, decoder.reason):
        return encoder.describe()
    return f"precision: encoder {encoder.summary()}; decoder {decoder.summary()}"


def resolve_precision(requested: str, device: torch.device, work: str) -> Precision:
    """The precision `work` (ENCODER or a decoder's model name) computes in on `device` when
    `requested` ("auto", "float32" or "bfloat16") is asked for; CaptionerError for bfloat16 where
    the device has no bf16 support."""
    if requested not in PRECISIONS:
        raise CaptionerError(f"unknown precision {requested!r}; choose one of {PRECISIONS}")
    if requested == "auto":
        dtype, reason = _automatic_choice(device, work)
        return Precision(dtype, device.type, reason, _channels_last(device, work))
    if requested == "bfloat16" and (why_not := missing_bf16_support(device)):
        raise CaptionerError(f"--precision bfloat16: {why_not}; use --precision auto or float32")
    return given_precision(requested, device, work, "as asked")


def given_precision(dtype: str, device: torch.device, work: str, reason: str) -> Precision:
    """`work` on `device` in `dtype` ("float32", "bfloat16", "float16"), chosen for `reason`
    (asked for, or recorded by the store being finished); CaptionerError for bfloat16 where the
    device has no bf16 support."""
    if dtype == "bfloat16" and (why_not := missing_bf16_support(device)):
        raise CaptionerError(f"bfloat16 ({reason}): {why_not}")
    return Precision(dtype, device.type, reason, _channels_last(device, work))


def _channels_last(device: torch.device, work: str) -> bool:
    return work == ENCODER and device.type in ("cpu", "cuda")


def _automatic_choice(device: torch.device, work: str) -> tuple[str, str]:
    """(dtype, why) of "auto"; the module docstring says why each."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "CUDA: tensor cores run bf16 faster"
        return "float16", "CUDA: this GPU has no bf16, float16 is its fast type"
    if device.type != "cpu":
        return "float32", f"bf16 is not known to be faster on {device.type}"
    flags = cpu_flags()
    if flags is None:
        return "float32", "this CPU's features are unknown"
    if "amx_bf16" not in flags:
        if "avx512_bf16" in flags:
            return "float32", "this CPU has no bf16 matrix units; its avx512_bf16 is slower"
        return "float32", "this CPU has no bf16 matrix units"
    if BF16_GAINS_ON_CPU_MATRIX_UNITS[work]:
        return "bfloat16", "this CPU's AMX units run bf16 products faster than float32"
    return "float32", f"the {work} decoder's small products run slower in bf16, even with AMX"


def missing_bf16_support(device: torch.device) -> str:
    """Why `device` cannot compute in bfloat16 (empty if it can): a CPU without bf16
    instructions (PyTorch would emulate them far slower than float32), a GPU without bf16, or
    Apple MPS before macOS 14. A CPU whose flags cannot be read is given the benefit of the
    doubt."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 support"
    if device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        return "Apple MPS computes in bf16 from macOS 14 on"
    if device.type == "cpu":
        flags = cpu_flags()
        if flags is not None and not flags.intersection(_BF16_INSTRUCTIONS):
            return (
                "this CPU has no bf16 instructions (amx_bf16, avx512_bf16), so bf16 would be"
                " emulated, many times slower than float32"
            )
    return ""


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (x86's `flags`, Arm's `Features` in /proc/cpuinfo); None where
    they cannot be read (macOS, Windows)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None
