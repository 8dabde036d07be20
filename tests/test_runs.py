"""`captioner runs`: training runs in one table and one figure, read from their output folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import make_store
from inference_factories import make_checkpoint
from PIL import Image

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.training.runs import RunsConfig, compare_runs, read_run


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s.zarr")


def make_run(folder: Path, store: Path, model: str, rows: list[dict], best: int | None, **options):
    """A run folder as training leaves it: metrics.jsonl and best.pt saved at epoch `best`
    (none when None), its options recorded as `options`."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if best is not None:
        checkpoint, _ = load_checkpoint(make_checkpoint(folder / "best.pt", store, model))
        row = next(row for row in rows if row["epoch"] == best)
        checkpoint.training = {"epoch": best - 1, "metrics": row, "options": options}
        save_checkpoint(folder / "best.pt", checkpoint)
    return folder


def epoch(number: int, bleu4: float, **more) -> dict:
    return {
        "epoch": number,
        "val_loss": 3.0 - bleu4,
        "val_bleu4": bleu4,
        "captions_per_s": 100.0 * number,
        "seconds": 10.0,
        **more,
    }


def test_the_table_says_what_each_run_is_and_reached(tmp_path, store):
    xe = make_run(tmp_path / "xe", store, "show-tell", [epoch(1, 0.2), epoch(2, 0.3)], best=2)
    # An SCST run chose its best.pt by CIDEr-D: epoch 2, though epoch 3 has the better BLEU-4.
    scst_rows = [
        epoch(n, b, val_cider=c, mean_reward=c / 2)
        for n, b, c in ((1, 0.25, 0.8), (2, 0.28, 0.95), (3, 0.29, 0.9))
    ]
    scst = make_run(
        tmp_path / "scst", store, "show-attend-tell", scst_rows, best=2, objective="scst"
    )
    transformer = make_run(tmp_path / "tf", store, "transformer", [epoch(1, 0.4)], best=1)
    runs, skipped = compare_runs(
        RunsConfig([xe, scst, transformer, tmp_path / "xe" / "best.pt"], tmp_path / "c.png")
    )
    assert [run.path for run in runs] == [xe, scst, transformer]
    assert "best.pt: no metrics.jsonl" in skipped[0]
    first, second, third = runs
    assert (first.model, first.objective, first.best_epoch, first.sizes) == (
        "show-tell",
        "xe",
        2,
        "emb 16 hid 24",
    )
    assert (second.model, second.objective, second.best_epoch) == ("show-attend-tell", "scst", 2)
    assert second.sizes == "emb 16 hid 24 att 12" and second.best_row["val_cider"] == 0.95
    assert first.captions_per_second == pytest.approx(150.0) and first.seconds == 20.0
    assert (third.model, third.sizes) == ("transformer", "d 24 layers 2 heads 4 ff 32")

    code, output = run_cli("runs", xe, scst, transformer, "--out", tmp_path / "curves.png")
    assert code == 0, output
    header, xe_line, scst_line, transformer_line = map(cells, output.splitlines()[:4])
    assert header[:4] == ["run", "model", "sizes", "vocab"]
    assert xe_line[2:] == [
        "emb 16 hid 24",
        "23",
        "xe",
        "2",
        "2",
        "0.3000",
        "-",
        "150",
        "0m20s",
        "ok",
    ]
    assert scst_line[4:] == ["scst", "3", "2", "0.2800", "0.9500", "200", "0m30s", "ok"]
    assert transformer_line[1:3] == ["transformer", "d 24 layers 2 heads 4 ff 32"]
    # validation loss, BLEU-4 and (rows carry it) CIDEr-D: three panels, on one figure
    assert Image.open(tmp_path / "curves.png").size == (1500, 450)


def cells(line: str) -> list[str]:
    """A table line's cells (separated by two spaces or more; a cell may hold one)."""
    return re.split(r" {2,}", line.strip())


def test_a_run_without_a_checkpoint_takes_its_best_bleu4_epoch(tmp_path, store):
    path = make_run(tmp_path / "r", store, "show-tell", [epoch(1, 0.3), epoch(2, 0.1)], None)
    run = read_run(path)
    assert (run.model, run.objective, run.best_epoch) == ("?", "xe", 1)


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_bad_folders_are_one_line_errors(tmp_path, store):
    code, output = run_cli("runs", tmp_path, "--out", tmp_path / "c.png")
    assert code == 1 and output.startswith("Error: ") and "no training run" in output
    path = make_run(tmp_path / "r", store, "show-tell", [epoch(1, 0.3)], None)
    with open(path / "metrics.jsonl", "a") as file:
        file.write('{"epoch": 2, "val_bl')  # cut off
    code, output = run_cli("runs", path, "--out", tmp_path / "c.png")
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert "metrics.jsonl:2: not a JSON line" in output
    (path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (path / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(
        CaptionerError, match=r"best.pt: not a checkpoint \(not a file that torch.save writes\)"
    ):
        read_run(path)


def test_a_failed_run_says_where_and_values_that_were_not_finite_show_as_dashes(tmp_path, store):
    failure = {"epoch": 3, "step": 4, "failed": "the loss or its gradient is NaN or inf"}
    rows = [epoch(1, 0.2), {**epoch(2, 0.25), "val_loss": None, "val_bleu4": None}, failure]
    failed = make_run(tmp_path / "failed", store, "show-tell", rows, best=1)
    # Runs from before null was written hold NaN (json.dumps writes it as a bare NaN).
    nan = float("nan")
    older_rows = [epoch(1, 0.2, val_cider=nan), {"epoch": 2, "val_loss": nan, "val_bleu4": nan}]
    older = make_run(tmp_path / "older", store, "show-tell", older_rows, None)
    at_once = make_run(tmp_path / "at_once", store, "show-tell", [{**failure, "epoch": 1}], None)
    code, output = run_cli("runs", failed, older, at_once, "--out", tmp_path / "c.png")
    assert code == 0, output
    lines = output.splitlines()
    assert cells(lines[1])[5:8] == ["2", "1", "0.2000"] and lines[1].endswith("failed")
    assert cells(lines[2])[5:9] == ["2", "1", "0.2000", "-"] and lines[2].endswith("ok")
    assert cells(lines[3])[5:7] == ["0", "-"] and lines[3].endswith("failed")
    assert lines[4] == f"{failed}: failed at epoch 3 step 4: the loss or its gradient is NaN or inf"
    assert lines[5].startswith(f"{at_once}: failed at epoch 1 step 4")
