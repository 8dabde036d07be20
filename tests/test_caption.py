"""`captioner caption`: files, folders and globs to one row each, resumable, spreadsheet-safe."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import failing_on_call, make_store
from inference_factories import make_checkpoint, report_data
from PIL import Image

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.encoder import EncoderConfig, build_encoder
from captioner.files import spreadsheet_safe, spreadsheet_value
from captioner.inference import caption as caption_module
from captioner.inference.caption import (
    CaptionConfig,
    caption_images,
    find_images,
    recorded_encoder,
)
from captioner.models.decode import DecodingConfig

# min_length: an untrained decoder may end a caption at once, and readable pictures need words
FAST = DecodingConfig(beam_size=2, min_length=1, max_length=6)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store of the tiny encoder's features (128 channels, 2x2 grid at 64 px)."""
    tiny = build_encoder(EncoderConfig("tiny", "none", 64))  # what `caption` will run
    return make_store(
        tmp_path_factory.mktemp("model") / "s.zarr",
        images=8,
        channels=128,
        weights_checksum=tiny.weights_checksum,
    )


@pytest.fixture(scope="module")
def checkpoint(store) -> Path:
    """An attention decoder over the store's features."""
    return make_checkpoint(store.parent / "best.pt", store)


def write_picture_zoo(folder: Path) -> dict[str, bool]:
    """Files of every awkward kind; name -> whether it is a readable picture."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nested" / "deeper").mkdir(parents=True)
    Image.new("RGB", (50, 40), (200, 30, 30)).save(folder / "rgb.jpg")
    Image.new("L", (30, 60), 128).save(folder / "gray.png")
    Image.new("CMYK", (40, 40), (0, 80, 160, 20)).save(folder / "cmyk.jpg")
    Image.new("RGBA", (40, 40), (0, 0, 255, 100)).save(folder / "alpha.png")
    Image.new("P", (20, 20)).save(folder / "palette.gif")
    Image.new("RGB", (40, 40), (0, 120, 0)).save(folder / "nested" / "inner.jpg")
    Image.new("RGB", (40, 40), (9, 9, 9)).save(folder / "nested" / "deeper" / "deep.JPG")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    good = folder / "truncated.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, quality=95)
    good.write_bytes(good.read_bytes()[:200])
    (folder / "notes.txt").write_text("not a picture, and not an image suffix: no row")
    (folder / ".hidden.jpg").write_bytes(b"")
    return {
        "rgb.jpg": True,
        "gray.png": True,
        "cmyk.jpg": True,
        "alpha.png": True,
        "palette.gif": True,
        "nested/inner.jpg": True,
        "nested/deeper/deep.JPG": True,
        "empty.jpg": False,
        "corrupt.jpg": False,
        "truncated.jpg": False,
    }


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_a_folder_gives_one_row_per_file_with_errors_where_due(tmp_path, checkpoint):
    zoo = write_picture_zoo(tmp_path / "pics")
    out = tmp_path / "captions.csv"
    config = CaptionConfig(
        [tmp_path / "pics"],
        checkpoint,
        out,
        recursive=True,
        decoding=FAST,
        batch_size=3,
        workers=2,
        device="cpu",
    )
    summary = caption_images(config)
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "caption", "log_prob", "error"]
    by_name = {Path(r["path"]).relative_to(tmp_path / "pics").as_posix(): r for r in rows}
    assert len(rows) == len(by_name) == len(zoo)
    assert set(by_name) == set(zoo)
    for name, readable in zoo.items():
        row = by_name[name]
        if readable:
            assert row["caption"] and not row["error"] and float(row["log_prob"]) < 0, name
        else:
            assert row["caption"] == "" and row["log_prob"] == "" and row["error"], name
    assert "empty" in by_name["empty.jpg"]["error"]
    assert (summary.files, summary.captioned, summary.failed, summary.skipped) == (10, 7, 3, 0)


def test_html_shows_every_row_of_the_output_with_its_picture_or_its_error(tmp_path, checkpoint):
    pictures = tmp_path / "pics"
    pictures.mkdir()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(pictures / "red.jpg")
    (pictures / "empty.jpg").write_bytes(b"")
    out, page = tmp_path / "captions.jsonl", tmp_path / "gallery.html"
    common = (
        "--checkpoint",
        checkpoint,
        "--out",
        out,
        "--format",
        "jsonl",
        "--html",
        page,
        "--beam-size",
        2,
        "--min-length",
        1,
        "--max-length",
        6,
        "--workers",
        0,
    )
    assert run_cli("caption", pictures, *common)[0] == 0
    Image.new("RGB", (40, 40), (0, 0, 200)).save(pictures / "blue.png")
    code, output = run_cli("caption", pictures, *common)  # a re-run captions only blue.png
    assert code == 0 and f"report: {page}" in output
    rows = {Path(row["path"]).name: row for row in map(json.loads, out.read_text().splitlines())}
    cards = {Path(card["id"]).name: card for card in report_data(page)["cards"]}
    assert set(cards) == set(rows) == {"red.jpg", "empty.jpg", "blue.png"}
    for name in ("red.jpg", "blue.png"):
        assert cards[name]["caption"] == rows[name]["caption"] != ""
        assert cards[name]["scores"] == {"log-prob": rows[name]["log_prob"]}
        assert (tmp_path / cards[name]["thumb"]).is_file()
        assert (tmp_path / cards[name]["link"]).resolve() == pictures / name
    assert cards["empty.jpg"]["note"] == rows["empty.jpg"]["error"]
    assert "empty" in cards["empty.jpg"]["missing"] and not cards["empty.jpg"]["scores"]


def test_an_output_holds_one_models_captions(tmp_path, checkpoint):
    """A re-run into an output with another checkpoint or other decoding is refused and says what
    differs; the same model (options it ignores may change, the checkpoint may move) resumes,
    and the gallery names the model that made the captions."""
    pictures = tmp_path / "pics"
    pictures.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(pictures / "red.jpg")
    other = make_checkpoint(tmp_path / "other.pt", Path(checkpoint).parent / "s.zarr", seed=1)
    out = tmp_path / "captions.csv"

    def caption(model: Path, *options) -> tuple[int, str]:
        return run_cli("caption", pictures, "--checkpoint", model, "--out", out, *options)

    assert caption(checkpoint, "--beam-size", 2)[0] == 0
    written = out.read_text()
    recorded = json.loads((tmp_path / "captions.csv.model.json").read_text())
    assert recorded["checkpoint"] == str(checkpoint) and recorded["decoding"]["beam_size"] == 2

    code, output = caption(other, "--strategy", "greedy")
    assert_one_line_error(code, output, f"{out}: its 1 captions were made otherwise")
    assert f"checkpoint: {checkpoint} (sha256" in output and f"{other} (sha256" in output
    assert "strategy: beam there, greedy now" in output and "another --out" in output
    code, output = caption(checkpoint, "--beam-size", 3)
    assert_one_line_error(code, output, "beam_size: 2 there, 3 now")
    assert out.read_text() == written  # nothing added, nothing lost

    moved = tmp_path / "moved.pt"
    moved.write_bytes(Path(checkpoint).read_bytes())
    Image.new("RGB", (40, 40), (0, 0, 200)).save(pictures / "blue.png")
    page = tmp_path / "gallery.html"
    code, output = caption(moved, "--beam-size", 2, "--seed", 5, "--html", page)  # (not sampled)
    assert code == 0 and "1 already in" in output and "by this checkpoint and decoding" in output
    assert len(read_csv(out)) == 2
    same_model = f"{moved} (sha256 {recorded['checkpoint_sha256'][:12]})"
    assert same_model in page.read_text()  # the model that made every caption on it


def test_an_output_that_does_not_say_what_made_it_is_not_added_to(tmp_path, checkpoint):
    """Outputs of earlier captioners (no record beside them) still read, but are not mixed with
    new captions; an empty one is simply started."""
    pictures = tmp_path / "pics"
    pictures.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(pictures / "red.jpg")
    out = tmp_path / "old.csv"
    earlier = "path,caption,log_prob,error\n/elsewhere/a.jpg,a red circle,-3.2000,\n"
    out.write_text(earlier)
    code, output = run_cli("caption", pictures, "--checkpoint", checkpoint, "--out", out)
    assert_one_line_error(code, output, f"{out}: its 1 captions do not say which checkpoint")
    assert out.read_text() == earlier and not (tmp_path / "old.csv.model.json").exists()
    (tmp_path / "empty.csv").write_text("")
    config = CaptionConfig([pictures], checkpoint, tmp_path / "empty.csv", decoding=FAST, workers=0)
    assert caption_images(config).captioned == 1
    assert (tmp_path / "empty.csv.model.json").is_file()


def test_without_recursive_subfolders_are_left_out_and_globs_work(tmp_path):
    write_picture_zoo(tmp_path / "pics")
    top = find_images([tmp_path / "pics"])
    assert not any("nested" in str(path) for path in top) and len(top) == 8
    pattern = str(tmp_path / "pics" / "**" / "*.jpg")
    assert {p.name for p in find_images([pattern], recursive=True)} == {
        "rgb.jpg",
        "cmyk.jpg",
        "inner.jpg",
        "empty.jpg",
        "corrupt.jpg",
        "truncated.jpg",
    }
    # The same file named twice, directly and through its folder, is captioned once.
    twice = find_images([tmp_path / "pics" / "rgb.jpg", tmp_path / "pics"])
    assert len(twice) == 8


@pytest.mark.parametrize("model", ["show-attend-tell", "transformer"])
def test_every_image_in_a_batch_gets_the_caption_it_gets_alone(tmp_path, store, model):
    checkpoint = make_checkpoint(tmp_path / "best.pt", store, model)
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (48, 48), (40 * i, 255 - 40 * i, (97 * i) % 256)).save(folder / f"{i}.png")
    batched, alone = tmp_path / "batched.csv", tmp_path / "alone.csv"
    caption_images(CaptionConfig([folder], checkpoint, batched, decoding=FAST, batch_size=6))
    caption_images(CaptionConfig([folder], checkpoint, alone, decoding=FAST, batch_size=1))
    assert [r["caption"] for r in read_csv(batched)] == [r["caption"] for r in read_csv(alone)]
    log_probs = [[float(r["log_prob"]) for r in read_csv(out)] for out in (batched, alone)]
    assert log_probs[0] == pytest.approx(log_probs[1], abs=2e-4)
    # the images are told apart (an untrained transformer may still give them the same words)
    assert len({(r["caption"], r["log_prob"]) for r in read_csv(batched)}) > 1


def test_jsonl_format_and_rerun_skips_what_is_done(tmp_path, checkpoint):
    zoo = write_picture_zoo(tmp_path / "pics")
    out = tmp_path / "captions.jsonl"
    config = CaptionConfig(
        [tmp_path / "pics"], checkpoint, out, format="jsonl", recursive=True, decoding=FAST
    )
    caption_images(config)
    first = out.read_text()
    entries = [json.loads(line) for line in first.splitlines()]
    assert len(entries) == len(zoo)
    assert set(entries[0]) == {"path", "caption", "log_prob", "error"}
    assert all((e["error"] is None) == (e["log_prob"] is not None) for e in entries)
    again = caption_images(config)
    assert (again.skipped, again.captioned, again.failed) == (len(zoo), 0, 0)
    assert out.read_text() == first


def test_a_rerun_from_another_folder_recognises_the_rows_written(tmp_path, checkpoint, monkeypatch):
    """Relative inputs are written as absolute paths, so a re-run from elsewhere that names the
    same files differently captions nothing twice."""
    zoo = write_picture_zoo(tmp_path / "pics")
    out = tmp_path / "captions.csv"
    monkeypatch.chdir(tmp_path)
    caption_images(CaptionConfig([Path("pics")], checkpoint, out, recursive=True, decoding=FAST))
    first = out.read_text()
    assert {r["path"] for r in read_csv(out)} == {str(tmp_path / "pics" / name) for name in zoo}
    monkeypatch.chdir(tmp_path / "pics")
    again = caption_images(
        CaptionConfig([Path(".")], checkpoint, out, recursive=True, decoding=FAST)
    )
    assert (again.skipped, again.captioned, again.failed) == (len(zoo), 0, 0)
    assert out.read_text() == first


def test_a_half_written_last_row_is_redone(tmp_path, checkpoint):
    write_picture_zoo(tmp_path / "pics")
    out = tmp_path / "captions.csv"
    config = CaptionConfig([tmp_path / "pics"], checkpoint, out, recursive=True, decoding=FAST)
    caption_images(config)
    complete = out.read_text()
    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:7])  # killed while writing row 5
    resumed = caption_images(config)
    assert (resumed.skipped, resumed.captioned + resumed.failed) == (4, 6)
    rows = read_csv(out)
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in read_csv_text(complete))
    assert out.read_text().startswith("".join(lines[:5]))


def read_csv_text(text: str) -> list[dict]:
    return list(csv.DictReader(text.splitlines()))


_SLOW_CAPTION = """
import sys, time
import captioner.inference.caption as caption
original = caption.generate
def slow(*args, **kwargs):
    time.sleep(0.15)
    return original(*args, **kwargs)
caption.generate = slow
from captioner.cli import main
main(sys.argv[1:], prog_name="captioner")
"""


def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path, checkpoint):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(30):
        Image.new("RGB", (40, 40), (8 * i, 100, 255 - 8 * i)).save(folder / f"img{i:02d}.png")
    out = tmp_path / "captions.csv"
    options = ["--checkpoint", str(checkpoint), "--batch-size", "2", "--workers", "0"]
    options += ["--beam-size", "2", "--max-length", "6"]
    args = [str(folder), "--out", str(out), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CAPTION, "caption", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 7:  # header + 6 rows
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = read_csv(out)
    assert 6 <= len(before) < 30

    code, output = run_cli("caption", *args)
    assert code == 0, output
    rows = read_csv(out)
    assert len(rows) == 30 and len({r["path"] for r in rows}) == 30
    assert rows[: len(before)] == before

    fresh = tmp_path / "fresh.csv"
    run_cli("caption", folder, "--out", fresh, *options)
    assert {r["path"]: r["caption"] for r in rows} == {
        r["path"]: r["caption"] for r in read_csv(fresh)
    }


def test_values_a_spreadsheet_would_run_are_defused(tmp_path, checkpoint):
    folder = tmp_path / "pics"
    folder.mkdir()
    for name in ("=HYPERLINK(1).png", "+1.png", "-2.png", "@SUM.png", "plain.png"):
        Image.new("RGB", (32, 32), (10, 20, 30)).save(folder / name)
    out = tmp_path / "captions.csv"
    config = CaptionConfig([folder], checkpoint, out, decoding=FAST)
    caption_images(config)
    with open(out, newline="", encoding="utf-8") as file:
        cells = [row[0] for row in csv.reader(file)][1:]
    names = [Path(spreadsheet_value(cell)).name for cell in cells]
    assert sorted(names) == sorted(p.name for p in folder.iterdir())
    # Cells start with the folder path here; as a spreadsheet sees a relative path:
    assert spreadsheet_safe("=HYPERLINK(1).png") == "'=HYPERLINK(1).png"
    for value in ("+1.png", "-2.png", "@SUM.png", "\tx", "=1+1"):
        assert spreadsheet_safe(value).startswith("'")
        assert spreadsheet_value(spreadsheet_safe(value)) == value
    assert spreadsheet_safe("-44.5") == "-44.5" and spreadsheet_safe("plain.png") == "plain.png"
    assert caption_images(config).skipped == 5

    relative = tmp_path / "relative.csv"
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        caption_images(CaptionConfig(["=HYPERLINK(1).png", "-2.png"], checkpoint, relative))
        again = caption_images(CaptionConfig(["=HYPERLINK(1).png", "-2.png"], checkpoint, relative))
    finally:
        os.chdir(cwd)
    with open(relative, newline="", encoding="utf-8") as file:
        written = [row[0] for row in csv.reader(file)][1:]
    # written absolute, so even names a spreadsheet would run start with the folder
    assert written == [str(folder / "=HYPERLINK(1).png"), str(folder / "-2.png")]
    assert again.skipped == 2


def test_local_encoder_weights_replace_the_recorded_ones(tmp_path, checkpoint):
    """A weights file with the recorded weights captions as the recorded encoder does; other
    weights are refused in one line unless --allow-other-weights, and then change captions."""
    folder = tmp_path / "pics"
    folder.mkdir()
    for shade in range(4):
        Image.new("RGB", (40, 40), (50 * shade, 60, 200 - 40 * shade)).save(folder / f"{shade}.png")
    same, other = tmp_path / "same.pt", tmp_path / "other.pt"
    state = build_encoder(EncoderConfig("tiny", "none", 64)).backbone.state_dict()
    torch.save(state, same)
    torch.save(
        {name: tensor.flip(0) if tensor.dim() == 4 else tensor for name, tensor in state.items()},
        other,
    )
    recorded, local = tmp_path / "recorded.csv", tmp_path / "local.csv"
    caption_images(CaptionConfig([folder], checkpoint, recorded, decoding=FAST))
    caption_images(CaptionConfig([folder], checkpoint, local, decoding=FAST, weights=same))
    assert read_csv(recorded) == read_csv(local)
    with_other_weights = ["caption", folder, "--checkpoint", checkpoint, "--weights", other]
    code, output = run_cli(*with_other_weights, "--out", tmp_path / "o.csv")
    assert_one_line_error(code, output, "other.pt", "--allow-other-weights")
    assert not (tmp_path / "o.csv").exists()
    code, output = run_cli(
        *with_other_weights, "--out", tmp_path / "o.csv", "--allow-other-weights"
    )
    assert code == 0, output
    captions = [row["caption"] for row in read_csv(tmp_path / "o.csv")]
    assert captions != [row["caption"] for row in read_csv(recorded)]
    code, output = run_cli(
        "caption",
        folder,
        "--checkpoint",
        checkpoint,
        "--out",
        tmp_path / "x.csv",
        "--weights",
        tmp_path / "missing.pt",
    )
    assert_one_line_error(code, output, "missing.pt")


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *fragments: str) -> None:
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), output
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_inputs_are_one_line_errors(tmp_path, checkpoint):
    write_picture_zoo(tmp_path / "pics")
    out = tmp_path / "c.csv"
    code, output = run_cli("caption", tmp_path / "nope", "--checkpoint", checkpoint, "--out", out)
    assert_one_line_error(code, output, "nope", "no such file or folder")
    code, output = run_cli("caption", tmp_path / "*.xyz", "--checkpoint", checkpoint, "--out", out)
    assert_one_line_error(code, output, "no file matches")
    code, output = run_cli(
        "caption", tmp_path / "pics", "--checkpoint", tmp_path / "none.pt", "--out", out
    )
    assert_one_line_error(code, output, "none.pt")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    code, output = run_cli(
        "caption", tmp_path / "pics", "--checkpoint", checkpoint, "--out", tmp_path / "other.csv"
    )
    assert_one_line_error(code, output, "not a captions CSV")
    assert (tmp_path / "other.csv").read_text() == "a,b\n1,2\n"  # never overwritten
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    code, output = run_cli("caption", empty, "--checkpoint", checkpoint, "--out", out)
    assert_one_line_error(code, output, "no image files")


def test_imagenet_features_are_captioned_with_the_recorded_torchvision_weights(checkpoint):
    """A checkpoint trained on "imagenet" features names the torchvision weights they came from;
    captioning builds those, not whatever DEFAULT the installed torchvision has."""
    recorded, _ = load_checkpoint(checkpoint)
    imagenet = replace(
        recorded,
        encoder_config=EncoderConfig("resnet50", "imagenet", 224),
        weights_id="ResNet50_Weights.IMAGENET1K_V1",
    )
    assert recorded_encoder(imagenet) == EncoderConfig("resnet50", "IMAGENET1K_V1", 224)
    assert recorded_encoder(recorded) == recorded.encoder_config  # not imagenet: as recorded


def test_sigterm_ends_captioning_after_the_batch_in_hand(tmp_path, checkpoint, monkeypatch):
    folder = tmp_path / "pics"
    folder.mkdir()
    for index in range(10):
        Image.new("RGB", (40, 40), (20 * index, 90, 50)).save(folder / f"{index}.png")
    features, calls = caption_module._features, []

    def signalled_on_the_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return features(*args)

    monkeypatch.setattr(caption_module, "_features", signalled_on_the_second_batch)
    out = tmp_path / "captions.csv"
    config = CaptionConfig([folder], checkpoint, out, decoding=FAST, batch_size=3, workers=0)
    summary = caption_images(config)
    assert summary.stopped == "SIGTERM" and summary.captioned == 6  # two whole batches
    assert len(read_csv(out)) == 6
    monkeypatch.setattr(caption_module, "_features", features)
    again = caption_images(config)
    assert (again.skipped, again.captioned, again.stopped) == (6, 4, "")
    assert sorted(r["path"] for r in read_csv(out)) == sorted(str(p) for p in folder.iterdir())


def test_a_full_disk_while_writing_rows_is_one_line_and_the_rerun_completes(
    tmp_path, checkpoint, monkeypatch
):
    folder = tmp_path / "pics"
    folder.mkdir()
    for index in range(7):
        Image.new("RGB", (40, 40), (30 * index, 20, 90)).save(folder / f"{index}.png")
    write = caption_module.CaptionOutput.write
    monkeypatch.setattr(
        caption_module.CaptionOutput, "write", failing_on_call(2, errno.ENOSPC, write)
    )
    out = tmp_path / "captions.csv"
    args = [
        "caption",
        folder,
        "--checkpoint",
        checkpoint,
        "--out",
        out,
        "--batch-size",
        "3",
        "--workers",
        "0",
        "--beam-size",
        "1",
    ]
    code, output = run_cli(*args)
    assert code == 1 and "No space left on device" in output.strip().splitlines()[-1]
    assert "Traceback" not in output
    monkeypatch.setattr(caption_module.CaptionOutput, "write", write)
    code, output = run_cli(*args)
    assert code == 0, output
    assert sorted(r["path"] for r in read_csv(out)) == sorted(str(p) for p in folder.iterdir())
