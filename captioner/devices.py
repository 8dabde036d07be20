"""The device a command computes on: the `--device` choices and how "auto" picks one; and the
CPUs it may use, which bound the default number of worker processes."""

from __future__ import annotations

import os

import torch

from captioner.errors import CaptionerError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device called `name`; "auto" picks CUDA, then Apple MPS, then the CPU. Asking for a
    device this machine lacks is an error. Under torchrun each rank takes GPU `local_rank`."""
    if name not in DEVICES:
        raise CaptionerError(f"unknown device {name!r}; choose one of {DEVICES}")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        raise CaptionerError("--gpu / --device cuda: CUDA is not available on this machine")
    if name == "mps" and not mps:
        raise CaptionerError("--device mps: Apple MPS is not available on this machine")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity (a container's or a batch job's share),
    not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (macOS and Windows have no affinity call)
        return os.cpu_count() or 1


def default_workers(most: int) -> int:
    """A default number of DataLoader worker processes: `most`, but never more than the CPUs
    available (more would only compete with the main process for them, and PyTorch warns)."""
    return min(most, available_cpus())


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a GPU's memory; None for a device that does not report it."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)
