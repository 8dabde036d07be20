"""The metrics log of a run: one row per epoch, kept in metrics.jsonl and drawn in curves.png,
and the line printed for each epoch."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from captioner import visualize
from captioner.files import atomic_file
from captioner.training.divergence import FAILED
from captioner.training.resume import RunState
from captioner.training.validation import Validation


@dataclass
class EpochTiming:
    """The steps a training call ran of an epoch: all of them, or a resumed epoch's remaining
    ones (none, where the run stopped after its last step)."""

    seconds: float  # from the first wait for a batch to the end of the last step
    data_wait: float  # of which waiting for the next batch
    captions: int

    def columns(self) -> dict:
        """The metrics.jsonl speed columns; none where no step ran (nothing was measured)."""
        if self.seconds <= 0:
            return {"seconds": 0.0}
        return {
            "captions_per_s": self.captions / self.seconds,
            "data_wait": self.data_wait / self.seconds,  # of rank 0
            "seconds": self.seconds,
        }


def epoch_row(
    state: RunState,
    timing: EpochTiming,
    validation: Validation,
    world_size: int,
    train: dict,
    lr: float,
) -> dict:
    """The metrics.jsonl row of the epoch `state` has just trained (`train`: the objective's
    `epoch_means`; `lr`: the learning rate of its last step) and `validation` measured."""
    return {
        "epoch": state.epoch + 1,
        # Losses are mean negative log-likelihood per target token, train and val alike; the
        # cross-entropy objective adds label smoothing and the attention penalty to the train one.
        **train,
        "lr": lr,
        **_validation_columns(validation),
        **timing.columns(),
        "ranks": world_size,
    }


def start_row(validation: Validation) -> dict:
    """The row "epoch 0" of a run that starts from trained weights (self-critical training):
    their validation, which the first epochs must beat to replace best.pt."""
    return {"epoch": 0, **_validation_columns(validation)}


def _validation_columns(validation: Validation) -> dict:
    repeating = validation.repeating()
    return {
        "val_loss": validation.loss,
        "val_ppl": perplexity(validation.loss),
        "val_bleu4": validation.bleu4,
        "val_cider": validation.cider,
        "sample": " ".join(validation.hypotheses[validation.sample_row]),
        "repeating_captions": len(repeating),
        "repeating_example": " ".join(repeating[0]) if repeating else "",
    }


def describe_epoch(row: dict, improved: bool, epochs: int) -> str:
    """The lines printed for a metrics row: the epoch's losses (or SCST's mean reward),
    validation loss, BLEU-4 and CIDEr-D, speed and sample caption; for row 0 (the starting
    weights of an SCST run) their validation alone."""
    validation = (
        f"val loss {row['val_loss']:.3f} ppl {row['val_ppl']:.1f}  BLEU-4 {row['val_bleu4']:.4f}"
        f"  CIDEr-D {row['val_cider']:.3f}{' (best)' if improved else ''}"
    )
    if row["epoch"] == 0:
        return f"start: {validation}\n  sample: {row['sample']}"
    if "mean_reward" in row:
        train = f"mean reward {row['mean_reward']:.3f}"
    else:
        train = f"train loss {row['train_loss']:.3f} ppl {row['train_ppl']:.1f}"
    if "captions_per_s" in row:
        speed = f"{row['captions_per_s']:.0f} captions/s  data wait {100 * row['data_wait']:.1f}%"
    else:
        speed = "no step left to time after resuming"
    return (
        f"epoch {row['epoch']}/{epochs}  objective {row['objective']:.3f}  {train}  {validation}"
        f"  {speed}\n  sample: {row['sample']}"
    )


def write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.jsonl and curves.png from the whole history (rewritten atomically each epoch, so a
    run killed between two writes never leaves a duplicate or a missing row after resume).

    The file is strict JSON, one object a line: a number that is NaN or inf is written as null
    (Python's json would write the bare NaN that other JSON readers refuse). A failed run's last
    row (captioner.training.divergence) is written too, but has no curve to add to."""
    lines = [json.dumps(_finite_or_null(row), allow_nan=False) + "\n" for row in history]
    with atomic_file(out / "metrics.jsonl", "w", encoding="utf-8") as file:
        file.write("".join(lines))
    epochs = [row for row in history if FAILED not in row]
    if epochs:
        visualize.save_training_curves(out / "curves.png", epochs)


def _finite_or_null(row: dict) -> dict:
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in row.items()
    }


def perplexity(mean_nll: float) -> float:
    return math.exp(min(mean_nll, 50.0))
