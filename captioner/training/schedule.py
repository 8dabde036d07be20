"""The learning rate of every optimizer step, a pure function of the step's number in the run.

A resumed run therefore continues the very schedule it was on: the number follows from the epoch
and the step that last.pt records, and every rank computes the same rate.

With a warm-up of W > 0 steps the rate rises linearly to `lr` over the first W steps and then
stays there; with W = 0 it is `lr` throughout, as the LSTMs train by default:

    rate(n) = lr * min(1, n / W),   n = 1, 2, ... the step's number

Why constant after the warm-up, and not Vaswani et al.'s decay as the inverse square root of the
step (lr = d^-0.5 min(n^-0.5, n W^-1.5)): on the demo's scenes that decay cost the transformer
some of its sense of layout for no gain in validation CIDEr-D (bench/RESULTS.md [demo]), the
LSTMs train at a constant rate too, and a constant rate needs no total number of steps, so
--epochs may still change when a run is resumed, and early stopping may end it anywhere, without
changing the rate of any step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LearningRateSchedule:
    lr: float  # --lr
    warmup_steps: int  # --warmup-steps; 0: `lr` throughout

    def rate(self, step: int) -> float:
        """The learning rate of optimizer step number `step` (1 for a run's first step)."""
        if step >= self.warmup_steps:
            return self.lr
        return self.lr * step / self.warmup_steps

    def set(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Give `optimizer` the rate of step `step`, which it is about to take; returns it."""
        rate = self.rate(step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        return rate
