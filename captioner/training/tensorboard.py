"""TensorBoard event files in the run folder, so that `tensorboard --logdir runs` compares runs.

Per step: the training loss, learning rate, gradient norm, captions/s and the share of the step
spent waiting for data. Per epoch: validation loss, BLEU-4 and CIDEr-D, train loss and perplexity
(self-critical runs: the mean sample reward), and the sample caption's attention figure.
tensorboard is an optional dependency (``pip install 'captioner[tensorboard]'``); without it a run
says once that it is not logging to TensorBoard and trains as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# The per-epoch metrics.jsonl values also plotted (those the row has), under these names.
EPOCH_SCALARS = {
    "val_loss": "val/loss",
    "val_bleu4": "val/bleu4",
    "val_cider": "val/cider",
    "train_loss": "epoch/train_loss",
    "train_ppl": "epoch/train_ppl",
    "mean_reward": "epoch/mean_reward",
    "captions_per_s": "epoch/captions_per_s",
}


class TensorBoardLog:
    """Writes the event files of one run (rank 0's); every method is a no-op without tensorboard."""

    def __init__(self, out: Path, say: Callable[[str], None]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            say(
                "not logging to TensorBoard: the tensorboard package is not installed"
                " (pip install 'captioner[tensorboard]')"
            )
            self._writer = None
        else:
            self._writer = SummaryWriter(str(out))

    def step(self, step: int, values: dict[str, float]) -> None:
        """Scalars of training step `step` (counted over the whole run), named train/NAME."""
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"train/{name}", value, step)

    def epoch(self, row: dict, attention_figure: Path | None) -> None:
        """An epoch's metrics.jsonl row, and the sample caption's attention figure if one was
        drawn."""
        if self._writer is None:
            return
        epoch = row["epoch"]
        for key, name in EPOCH_SCALARS.items():
            value = row.get(key)
            if isinstance(value, int | float) and math.isfinite(value):  # not null, NaN or inf
                self._writer.add_scalar(name, value, epoch)
        self._writer.add_text("val/sample", row["sample"], epoch)
        if attention_figure is not None and attention_figure.is_file():
            with Image.open(attention_figure) as figure:
                pixels = np.asarray(figure.convert("RGB"))
            self._writer.add_image("val/attention", pixels, epoch, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
