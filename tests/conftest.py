"""Fixtures shared by the test modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Compute in this process as a subprocess with OMP_NUM_THREADS=1 does: with other thread
    counts, float32 sums may split differently and round to a neighbouring value."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="session")
def native_scores(tmp_path_factory: pytest.TempPathFactory):
    """The compiled attention scores, built once per test session in a temporary cache; the
    tests that need them skip where this machine cannot build them (no C compiler, no libmvec)."""
    from captioner.models.native_attention import load_native_scores

    native, note = load_native_scores(tmp_path_factory.mktemp("kernels"))
    if native is None:
        pytest.skip(f"compiled attention scores unavailable: {note}")
    return native
