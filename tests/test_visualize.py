"""The figures are real PNGs of the expected size, and the heatmaps follow the attention."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.visualize import (
    attention_strip,
    run_comparison,
    save_attention_figure,
    save_training_curves,
    training_curves,
)

GRID = (3, 4)


def one_hot_alphas(count: int, region: int = 0) -> np.ndarray:
    alphas = np.full((count, GRID[0] * GRID[1]), 0.01, dtype=np.float32)
    alphas[:, region] = 1.0
    return alphas / alphas.sum(1, keepdims=True)


def pixels(path) -> np.ndarray:
    with Image.open(path) as png:
        assert png.format == "PNG"
        return np.asarray(png.convert("RGB"))


def test_attention_over_an_image(tmp_path):
    words = ["a", "red", "ball", "on", "the", "green", "grass"]
    image = Image.new("RGB", (64, 48), (30, 140, 60))
    path = tmp_path / "attention" / "sample.png"
    save_attention_figure(path, words, one_hot_alphas(len(words)), GRID, image)
    drawn = pixels(path)
    assert drawn.shape == (2 * 200, 5 * 200, 3)  # 7 words: 5 columns, 2 rows of 200 px panels
    assert len(np.unique(drawn.reshape(-1, 3), axis=0)) > 50  # image, heatmap, titles
    assert os.listdir(path.parent) == ["sample.png"]  # no temporary file left


def test_attention_grid_without_image_follows_the_weights(tmp_path):
    left, right = tmp_path / "left.png", tmp_path / "right.png"
    save_attention_figure(left, ["dog", "runs"], one_hot_alphas(2, region=0), GRID, None)
    save_attention_figure(right, ["dog", "runs"], one_hot_alphas(2, region=11), GRID, None)
    assert pixels(left).shape == (200, 400, 3)
    # Region 0 is the grid's top-left cell, region 11 its bottom-right one: the bright cell moves.
    (left_y, left_x), (right_y, right_x) = bright_centre(left), bright_centre(right)
    assert left_x < right_x and left_y < right_y


def bright_centre(path) -> tuple[float, float]:
    """Centre of the heatmap's brightest colour (inferno's pale yellow, not the white background)
    in the first panel."""
    panel = pixels(path)[:, :200].astype(int)
    bright = (panel.sum(2) > 600) & (panel[:, :, 2] < 200)
    rows, columns = np.nonzero(bright)
    assert len(rows) > 100
    return rows.mean(), columns.mean()


def test_empty_caption_still_gives_a_figure(tmp_path):
    path = tmp_path / "empty.png"
    save_attention_figure(path, [], np.zeros((0, 12), dtype=np.float32), GRID, None)
    assert pixels(path).shape == (200, 200, 3)


def test_alphas_must_match_words_and_grid(tmp_path):
    with pytest.raises(ValueError, match="do not match 2 words"):
        save_attention_figure(tmp_path / "bad.png", ["a", "b"], np.zeros((2, 5)), GRID, None)
    assert not (tmp_path / "bad.png").exists()


def test_training_curves(tmp_path):
    rows = [
        {"epoch": 1, "train_loss": 4.1, "val_loss": 3.9, "val_bleu4": 0.05},
        {"epoch": 2, "train_loss": 3.2, "val_loss": 3.3, "val_bleu4": 0.11},
        {"epoch": 3, "train_loss": 2.8, "val_loss": 3.1},  # a row without BLEU-4 is drawn too
    ]
    path = tmp_path / "curves.png"
    save_training_curves(path, rows)
    drawn = pixels(path)
    assert drawn.shape == (400, 1500, 3)
    save_training_curves(path, rows[:1])  # overwritten in place, one epoch is enough
    assert not np.array_equal(pixels(path), drawn)


def test_training_curves_of_a_self_critical_run_draw_its_cider_and_reward(tmp_path):
    """SCST rows have no train loss but validation CIDEr-D and the samples' mean reward: the
    third panel draws them (and stays empty for rows without them)."""
    rows = [
        {"epoch": 1, "val_loss": 0.8, "val_bleu4": 0.45, "val_cider": 2.1, "mean_reward": 1.6},
        {"epoch": 2, "val_loss": 0.9, "val_bleu4": 0.48, "val_cider": 2.3, "mean_reward": 2.0},
    ]
    save_training_curves(tmp_path / "scst.png", rows)
    bare = [
        {k: v for k, v in row.items() if k in ("epoch", "val_loss", "val_bleu4")} for row in rows
    ]
    save_training_curves(tmp_path / "bare.png", bare)

    def lines_in_cider_panel(path: Path) -> int:
        """Pixels of matplotlib's first two line colours in the right-hand panel."""
        panel = pixels(path)[:, 1000:].astype(int)
        colours = [(31, 119, 180), (255, 127, 14)]  # tab:blue, tab:orange
        return sum(int((np.abs(panel - c).sum(-1) < 30).sum()) for c in colours)

    # without the values nothing is drawn there, not even a legend
    drawn, without = (lines_in_cider_panel(tmp_path / f) for f in ("scst.png", "bare.png"))
    assert drawn > 100 and without == 0


def legends(figure) -> list[list[str]]:
    """The labels each panel's legend lists (none for a panel without a legend)."""
    return [
        [text.get_text() for text in axes.get_legend().get_texts()] if axes.get_legend() else []
        for axes in figure.axes
    ]


def test_legends_list_only_the_curves_drawn():
    xe = [
        {"epoch": e, "train_loss": 3.0 / e, "val_loss": 3.1 / e, "val_bleu4": 0.1 * e,
         "val_cider": 0.2 * e}
        for e in (1, 2)
    ]  # fmt: skip
    assert legends(training_curves(xe)) == [["train loss", "val loss"], [], ["val (greedy)"]]
    scst = [{**row, "train_loss": None, "mean_reward": 0.3 * row["epoch"]} for row in xe]
    assert legends(training_curves(scst)) == [
        ["val loss"],
        [],
        ["val (greedy)", "train samples (SCST)"],
    ]
    diverged = [{"epoch": 1, "val_loss": float("nan"), "val_bleu4": None}]
    comparison = run_comparison({"good": xe, "diverged": diverged})
    assert [t.get_text() for t in comparison.legends[0].get_texts()] == ["good"]


def test_attention_strip_lights_each_words_region_of_the_picture(tmp_path):
    alphas = np.concatenate([one_hot_alphas(1, region=0), one_hot_alphas(1, region=11)])
    picture = Image.new("RGB", (80, 60), (200, 200, 200))
    strip = np.asarray(attention_strip(alphas, GRID, picture, side=40), dtype=int)
    assert strip.shape == (30, 80, 3)  # two panels of the picture shrunk to 40 x 30
    first, second = strip[:, :40], strip[:, 40:]
    assert first[2, 2, 0] > 180 and first[-3, -3, 0] < 80  # top-left lit, bottom-right dim
    assert second[2, 2, 0] < 80 and second[-3, -3, 0] > 180
    grid = np.asarray(attention_strip(alphas, GRID, None, side=24), dtype=int)
    assert grid.shape == (24, 48, 3) and grid[0, 0, 0] == 255 and grid[-1, 0, 0] < 10
