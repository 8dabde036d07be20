"""This process's place among torchrun's processes, and the few collectives extraction and
training need.

Without torchrun the process is rank 0 of 1 and every collective simply returns its input, so
the pipelines read the same whether or not they were launched by torchrun.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from captioner.errors import CaptionerError


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Ranks:
        """The place torchrun gave this process in RANK, WORLD_SIZE and LOCAL_RANK."""
        environ = os.environ
        return cls(
            int(environ.get("RANK", 0)),
            int(environ.get("WORLD_SIZE", 1)),
            int(environ.get("LOCAL_RANK", 0)),
        )

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes shared files and reports."""
        return self.rank == 0

    def gather(self, value: object) -> list:
        """`value` of every rank, in rank order."""
        if self.world_size == 1:
            return [value]
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of every rank's `values`."""
        return [sum(column) for column in zip(*self.gather(values), strict=True)]

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is true on any rank: one small all-reduce on `device` (the backend's)."""
        if self.world_size == 1:
            return flag
        votes = torch.tensor([float(flag)], device=device)
        dist.all_reduce(votes)
        return bool(votes.item() > 0)

    def broadcast(self, value: object) -> object:
        """Rank 0's `value` on every rank; also a barrier."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# What gloo and NCCL say when another rank is gone: it died (the connection closed) or it stopped
# answering (the collective timed out, 30 minutes for gloo and 10 for NCCL by default).
_LOST_RANK_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timeout")


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Inside it, this process belongs to torchrun's process group (NCCL on CUDA, gloo
    elsewhere). A group that already exists was made by the caller: it is used and left alone.
    A rank whose peers are gone stops with one line instead of a backend's traceback."""
    joined = ranks.world_size > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    except RuntimeError as error:
        if ranks.world_size == 1 or not any(sign in str(error) for sign in _LOST_RANK_SIGNS):
            raise
        raise CaptionerError(
            f"rank {ranks.rank}: lost the other processes ({str(error).splitlines()[0][:160]});"
            " one of them has probably died: see its output, fix the cause and run the same"
            " command again (training: with --resume)"
        ) from None
    finally:
        if joined:
            dist.destroy_process_group()
