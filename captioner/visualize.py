"""Pictures for people: where the attention model looked for each word, and how training went.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, so no global figure state and
no display needed) and written atomically, so a viewer never sees a half-written PNG. matplotlib
is imported inside the drawing functions: it takes a noticeable time to import, and every
`captioner` command would pay it at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from captioner.files import atomic_file

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
PANEL_INCHES = 2.0  # one word's panel: 200 x 200 pixels
MAX_COLUMNS = 5
IMAGE_SIDE = 224  # the picture is shrunk to at most this many pixels a side before drawing


def save_attention_figure(
    path: Path,
    words: Sequence[str],
    alphas: np.ndarray,
    grid: tuple[int, int],
    image: Image.Image | None = None,
) -> None:
    """One PNG: a panel per word, titled with the word, showing its attention weights.

    `alphas` (len(words), H*W) are the weights over the `grid` (H, W) regions. With `image`,
    each panel is the image with the grid upsampled over it as a heatmap; without, the grid
    itself as a heatmap. An empty caption gives one panel saying so.
    """
    from matplotlib.figure import Figure

    height, width = grid
    alphas = np.asarray(alphas, dtype=np.float32)
    if alphas.shape != (len(words), height * width):
        raise ValueError(
            f"alphas of shape {alphas.shape} do not match {len(words)} words on a {grid} grid"
        )
    panels = list(zip(words, alphas.reshape(-1, height, width), strict=True))
    if not panels:
        panels = [("(empty caption)", None)]
    picture = shrunk(image) if image is not None else None

    columns = min(MAX_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(columns * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI)
    for number, (word, alpha) in enumerate(panels, start=1):
        axes = figure.add_subplot(rows, columns, number)
        axes.set_title(word, fontsize=10)
        axes.axis("off")
        if picture is not None:
            axes.imshow(picture)
            if alpha is not None:
                # A spotlight, as in the paper's figures: unattended regions fade to black.
                axes.imshow(_upsampled(alpha, picture.size), cmap="gray", alpha=0.7)
        elif alpha is not None:
            axes.imshow(alpha, cmap="inferno", interpolation="nearest")
    _save(figure, path)


def attention_strip(
    alphas: np.ndarray, grid: tuple[int, int], image: Image.Image | None, side: int
) -> Image.Image:
    """One picture with a panel per word, side by side, each fitting in `side` x `side` pixels:
    the image dimmed where the word's attention is low (the strip in report.html), or, without
    an image, the grid of weights in gray. `alphas` is (words, H*W) over the `grid` (H, W)."""
    height, width = grid
    alphas = np.asarray(alphas, dtype=np.float32).reshape(-1, height, width)
    picture = shrunk(image, side) if image is not None else None
    size = picture.size if picture is not None else (side, side)
    strip = Image.new("RGB", (size[0] * max(len(alphas), 1), size[1]), (255, 255, 255))
    for number, alpha in enumerate(alphas):
        weights = alpha / max(float(alpha.max()), 1e-12)  # the word's strongest region is 1
        if picture is None:
            gray = Image.fromarray(np.uint8(255 * weights)).resize(size, Image.Resampling.NEAREST)
            panel = gray.convert("RGB")
        else:
            light = 0.25 + 0.75 * np.clip(_upsampled(weights, size), 0.0, 1.0)
            panel = Image.fromarray(np.uint8(np.asarray(picture) * light[..., None]))
        strip.paste(panel, (number * size[0], 0))
    return strip


def save_training_curves(path: Path, rows: Sequence[dict]) -> None:
    """One PNG of a run's metrics rows per epoch (see `training_curves`)."""
    _save(training_curves(rows), path)


def training_curves(rows: Sequence[dict]) -> Figure:
    """A run's metrics rows per epoch: train/val loss, val BLEU-4, and val CIDEr-D with
    (self-critical runs) the mean reward of the training samples, also CIDEr-D. Keys: "epoch",
    "train_loss", "val_loss", "val_bleu4", "val_cider", "mean_reward"; a missing, null or
    non-finite value is left out of its curve, and a curve without values out of the legend."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4), dpi=DPI)
    loss_axes, bleu_axes, cider_axes = figure.subplots(1, 3)
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        _plot(loss_axes, rows, key, label=label)
    loss_axes.set(xlabel="epoch", ylabel="loss per token", title="Loss")
    _plot(bleu_axes, rows, "val_bleu4", color="tab:green")
    bleu_axes.set(xlabel="epoch", ylabel="BLEU-4", title="Validation BLEU-4 (greedy)")
    for key, label in (("val_cider", "val (greedy)"), ("mean_reward", "train samples (SCST)")):
        _plot(cider_axes, rows, key, label=label)
    cider_axes.set(xlabel="epoch", ylabel="CIDEr-D", title="CIDEr-D")
    for axes in (loss_axes, bleu_axes, cider_axes):
        _finish(axes)
    figure.tight_layout()
    return figure


def save_run_comparison(path: Path, histories: Mapping[str, Sequence[dict]]) -> None:
    """One PNG comparing runs (see `run_comparison`)."""
    _save(run_comparison(histories), path)


def run_comparison(histories: Mapping[str, Sequence[dict]]) -> Figure:
    """Runs compared: their validation loss, BLEU-4 and, when some run's rows carry it, CIDEr-D
    per epoch, one line per run (named by the mapping's keys, in one colour on every panel) on
    shared axes. The legend lists the runs drawn on some panel."""
    from matplotlib.figure import Figure

    panels = [("val_loss", "Validation loss per token"), ("val_bleu4", "Validation BLEU-4")]
    if any(row.get("val_cider") is not None for rows in histories.values() for row in rows):
        panels.append(("val_cider", "Validation CIDEr-D"))
    figure = Figure(figsize=(5 * len(panels), 4.5), dpi=DPI)
    axes_row = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (key, title) in zip(axes_row, panels, strict=True):
        for number, (name, rows) in enumerate(histories.items()):
            _plot(axes, rows, key, marker=".", label=name, color=f"C{number % 10}")
        axes.set(xlabel="epoch", title=title)
        _finish(axes, legend=False)
    drawn: dict = {}  # run name -> its line, from whichever panel drew it
    for axes in axes_row:
        handles, labels = axes.get_legend_handles_labels()
        drawn.update(zip(labels, handles, strict=True))
    names = [name for name in histories if name in drawn]
    if names:
        lines = [drawn[name] for name in names]
        figure.legend(lines, names, loc="lower center", ncol=min(len(names), 3), fontsize=8)
    figure.tight_layout(rect=(0, 0.06 * math.ceil(len(names) / 3), 1, 1))
    return figure


def _plot(axes: Axes, rows: Sequence[dict], key: str, **style) -> None:
    """The curve of `key` per epoch, when the rows hold a finite value of it (an empty curve
    would still be listed in the legend)."""
    epochs, values = _series(rows, key)
    if epochs:
        axes.plot(epochs, values, **({"marker": "o"} | style))


def _finish(axes: Axes, legend: bool = True) -> None:
    """Grid, whole-number epochs, and the legend of what the axes drew (none if nothing)."""
    from matplotlib.ticker import MaxNLocator

    if legend and axes.get_legend_handles_labels()[0]:
        axes.legend()
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _series(rows: Sequence[dict], key: str) -> tuple[list, list]:
    points = [(row["epoch"], row[key]) for row in rows if row.get(key) is not None]
    points = [(epoch, value) for epoch, value in points if math.isfinite(value)]
    return [epoch for epoch, _ in points], [value for _, value in points]


def shrunk(image: Image.Image, side: int = IMAGE_SIDE) -> Image.Image:
    """A copy of `image` in RGB, at most `side` pixels a side, aspect kept."""
    picture = image.convert("RGB")
    picture.thumbnail((side, side))
    return picture


def _upsampled(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The (H, W) grid stretched smoothly over a picture of `size` (width, height). The encoder
    resizes images to a square, so the grid spans the whole picture whatever its aspect."""
    return np.asarray(Image.fromarray(alpha).resize(size, Image.Resampling.BILINEAR))


def _save(figure: Figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    with atomic_file(path) as file:
        figure.savefig(file, format="png")
