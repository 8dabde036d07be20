"""A run whose numbers stop being finite stops at once, and says so.

A NaN or an infinity in a step's loss or gradient norm, in an epoch's metrics, or in the weights
about to be saved ends the run with `TrainingDiverged`: one line that names the epoch and step and
what to try. Nothing is written from the weights at hand: last.pt stays the last good state and
best.pt the best finite one. The run records how it ended: the last row of its metrics.jsonl is a
failure row, ``{"epoch": E, "step": S, "failed": "..."}``, which `captioner runs` shows (after
the epoch's own row, its NaN and inf as null, when it was the epoch's metrics that were not
finite); a resumed run rewrites metrics.jsonl from last.pt, without them.

Under torchrun every rank reaches the same verdict at the same step (the step's check is an
all-reduce, the epoch's metrics are rank 0's broadcast, and the weights are the same on every
rank), so all of them stop together.
"""

from __future__ import annotations

import math
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.training.config import TrainConfig

FAILED = "failed"  # the key that marks a metrics row as the failure row


class TrainingDiverged(CaptionerError):
    """Training met `what` (e.g. "the loss or its gradient is NaN or inf") at `epoch` (1-based)
    and `step` (1-based; None at the epoch's end), and stopped. `epoch_row`: the epoch's metrics
    row when they were what was not finite."""

    def __init__(
        self,
        config: TrainConfig,
        epoch: int,
        step: int | None,
        what: str,
        epoch_row: dict | None = None,
    ) -> None:
        where = f"epoch {epoch}" + (f" step {step}" if step is not None else "")
        last = Path(config.out) / "last.pt"
        kept = (
            f"{last} keeps the last good state and best.pt the best finite weights"
            if last.is_file()
            else "no checkpoint was written"
        )
        super().__init__(
            f"{config.out}: training stopped at {where}: {what}; {kept}. Train again in a new"
            f" --out with a lower --lr (this run's: {config.lr:g}), and check the features with"
            f" `captioner features verify {config.features}`"
        )
        failure = {"epoch": epoch, "step": step, FAILED: what}
        self.rows = [epoch_row, failure] if epoch_row else [failure]  # for metrics.jsonl's end


def non_finite_columns(row: dict) -> list[str]:
    """The names of the numbers in a metrics row that are NaN or inf."""
    return [
        name for name, value in row.items() if isinstance(value, float) and not math.isfinite(value)
    ]
