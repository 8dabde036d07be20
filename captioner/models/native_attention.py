"""The attention scores as a compiled C loop on the CPU (additive_scores.c), built on first use.

The additive attention's tanh(projection + query) over (captions, regions, attention size) is a
third of a training step on a CPU when it runs as PyTorch ops: an add, a tanh and a product
forward, nine passes backward. additive_scores.c does each direction in one pass, 2.4x faster:
3.8 against 9.2 ms forward and backward for 16 images x 5 captions x 196 regions x 512, so an
attention step at batch 80 spends 0.10 s in it instead of 0.21 s (bench/RESULTS.md [speed]). It
is the same function: tests/test_native_attention.py checks scores and gradients against the
PyTorch ops, and tests/test_models.py the whole model's loss, gradients and captions against the
plain reference.

The library is compiled with the system's C compiler (``$CC``, else ``cc``) into
``$XDG_CACHE_HOME/captioner/kernels`` (default ``~/.cache``), once per source, compiler and CPU:
0.2 s, then loaded from there. It needs glibc's vector tanhf (libmvec, x86-64 Linux); without
it, or without a compiler, `load_native_scores` says why and the PyTorch ops run. Only training
and evaluate ask for it (`captioner.models.load_native_attention`), and only for attention maps
large enough to profit (`worth_compiling`), so tests with tiny models and one-image captioning
never compile anything.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("additive_scores.c")
FLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fno-math-errno",
    "-fopenmp",
    "-fPIC",
    "-shared",
)
LIBRARIES = ("-lmvec", "-lm")
# Below this many values per (row, step), regions x attention size, PyTorch's ops are quick
# enough that compiling is not worth it (tiny test models, toy sizes).
MIN_VALUES_PER_ROW = 4096
COMPILE_SECONDS = 120  # a compiler that hangs longer is treated as none


def worth_compiling(regions: int, attention_size: int) -> bool:
    return regions * attention_size >= MIN_VALUES_PER_ROW


class NativeScores:
    """The loaded library: scores and their gradients for contiguous float32 CPU tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        library = ctypes.CDLL(str(path))
        pointer, size = ctypes.c_void_p, ctypes.c_long
        self._forward = library.additive_scores_forward
        self._forward.argtypes = [pointer] * 4 + [size] * 4 + [ctypes.c_float, ctypes.c_int]
        self._backward = library.additive_scores_backward
        self._backward.argtypes = [pointer] * 7 + [size] * 4 + [ctypes.c_int]
        for function in (self._forward, self._backward):
            function.restype = ctypes.c_int

    @staticmethod
    def accepts(*tensors: Tensor) -> bool:
        return all(t.is_cpu and t.dtype == torch.float32 for t in tensors)

    def forward(self, projection: Tensor, query: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """Scores (G, k, L) of projection (G, L, A), query (G, k, A), weight (A,), bias (1,)."""
        _check_shapes(projection, query, weight, bias.reshape(-1))
        projection, query, weight = _contiguous(projection, query, weight)
        scores = projection.new_empty(len(projection), query.size(1), projection.size(1))
        self._call(self._forward, (projection, query, weight, scores), float(bias))
        return scores

    def backward(
        self, projection: Tensor, query: Tensor, weight: Tensor, grad_scores: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The gradients of projection, query and weight for `grad_scores` (G, k, L)."""
        _check_shapes(projection, query, weight)
        if grad_scores.shape != (len(projection), query.size(1), projection.size(1)):
            raise ValueError(f"grad_scores {tuple(grad_scores.shape)} for {tuple(query.shape)}")
        projection, query, weight, grad_scores = _contiguous(projection, query, weight, grad_scores)
        grads = torch.empty_like(projection), torch.empty_like(query), torch.zeros_like(weight)
        self._call(self._backward, (projection, query, weight, grad_scores, *grads))
        return grads

    @staticmethod
    def _call(function: ctypes._CFuncPtr, tensors: tuple[Tensor, ...], *scalars: float) -> None:
        """`function` of the tensors' data, the sizes of projection and query (the first two),
        `scalars` and the thread count."""
        (images, regions, size), rows = tensors[0].shape, tensors[1].size(1)
        pointers = (tensor.data_ptr() for tensor in tensors)
        status = function(*pointers, images, rows, regions, size, *scalars, torch.get_num_threads())
        if status != 0:
            raise MemoryError("additive_scores.c: no memory for the weight gradient's partial sums")


def _check_shapes(
    projection: Tensor, query: Tensor, weight: Tensor, bias: Tensor | None = None
) -> None:
    """The C loops trust their sizes: anything else would read past the tensors' ends."""
    images, _, size = projection.shape
    if query.dim() != 3 or query.size(0) != images or query.size(2) != size:
        raise ValueError(f"query {tuple(query.shape)} for projection {tuple(projection.shape)}")
    if weight.shape != (size,) or (bias is not None and bias.shape != (1,)):
        raise ValueError(f"weight {tuple(weight.shape)} for attention size {size}")


def _contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(tensor.detach().contiguous() for tensor in tensors)


def cache_directory() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "captioner" / "kernels"


def load_native_scores(cache: Path | None = None) -> tuple[NativeScores | None, str]:
    """The compiled scores (built into `cache` if not there yet) and a note on where they came
    from; (None, why) where no compiler, no libmvec or no x86-64 Linux makes it impossible."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"needs x86-64 Linux for glibc's vector tanhf, not {platform.platform()}"
    named = shlex.split(os.environ.get("CC", "cc")) or ["cc"]  # e.g. CC="ccache gcc"
    found = shutil.which(named[0])
    if found is None:
        return None, f"no C compiler ({named[0]}) on PATH"
    compiler = [found, *named[1:]]
    cache = cache or cache_directory()
    try:
        path = cache / f"additive_scores-{_build_key(compiler)}.so"
        built = "cached"
        if not path.is_file():
            error, built = _compile(compiler, path), "compiled"
            if error:
                return None, error
    except (OSError, subprocess.SubprocessError) as failure:  # read-only cache, a hung compiler
        return None, f"could not build in {cache}: {failure}"
    try:
        return NativeScores(path), f"{built} in {path}"
    except OSError as error:  # e.g. a cache on a noexec mount
        return None, f"could not load {path}: {error}"


def _build_key(compiler: list[str]) -> str:
    """What the library depends on: the source, the flags, the compiler and this CPU's features
    (-march=native: a home directory shared by unlike machines keeps one library for each)."""
    version = subprocess.run(
        [*compiler, "--version"], capture_output=True, text=True, timeout=COMPILE_SECONDS
    ).stdout
    parts = [SOURCE.read_text(), " ".join(FLAGS + LIBRARIES), version, _cpu_flags()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compile(compiler: list[str], path: Path) -> str:
    """Builds the library at `path` (written whole, then renamed: ranks of one run may build at
    once); returns an error note, or "" on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = Path(scratch) / path.name
        command = [*compiler, *FLAGS, str(SOURCE), "-o", str(built), *LIBRARIES]
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_SECONDS)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or ["no output"]
            cause = next((line for line in lines if "error" in line), lines[-1])
            return f"{Path(compiler[-1]).name} could not build {SOURCE.name}: {cause.strip()}"
        os.replace(built, path)
    return ""
