"""Progress as its reader sees it: bars on a terminal, plain timed lines in a log file."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from factories import make_store

from captioner import progress as progress_module
from captioner.cli import demo_commands, main
from captioner.progress import Progress, bar, tracked


class FakeClock:
    """Time that moves only when a test moves it, or by `tick` seconds at each reading."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress_module, "_now", fake)
    monkeypatch.setattr(progress_module, "_last_line_at", fake.now)
    return fake


def test_off_a_terminal_a_long_phase_is_a_plain_line_per_interval_and_one_at_its_end(clock):
    log = io.StringIO()
    with bar(Progress(interval=30, stream=log), "extract", total=1000, unit="img") as display:
        for _ in range(1000):
            clock.now += 0.25  # 4 img/s: 250 s in all
            display.update()
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) == 250 // 30 + 1  # one per 30 s, plus the end line
    assert lines[0] == "extract: 120/1000 img (12%), 4.0 img/s, 3:40 left"
    assert lines[-1] == "extract: 1000/1000 img in 4:10, 4.0 img/s"
    for line in lines[:-1]:
        assert re.fullmatch(r"extract: \d+/1000 img \(\d+%\), 4\.0 img/s, \d+:\d\d left", line)


def test_a_phase_shorter_than_the_interval_says_only_how_it_ended(clock):
    log = io.StringIO()
    shards = []
    for shard in tracked(range(5), Progress(stream=log), "verifying", unit="shard"):
        clock.now += 2
        shards.append(shard)
    assert shards == [0, 1, 2, 3, 4]
    assert log.getvalue() == "verifying: 5/5 shard in 0:10, 0.5 shard/s\n"


def test_the_interval_counts_from_the_last_line_of_any_phase(clock):
    log = io.StringIO()
    shown = Progress(interval=30, stream=log)
    clock.now += 25  # work that shows no progress
    with bar(shown, "vocabulary", total=10, unit="cap") as display:
        clock.now += 5
        display.update(5)  # 30 s after the last line (here: the start): a line is due
        clock.now += 5
        display.update(5)
    assert log.getvalue().splitlines() == [
        "vocabulary: 5/10 cap (50%), 1.0 cap/s, 0:05 left",
        "vocabulary: 10/10 cap in 0:10, 1.0 cap/s",
    ]


def test_a_quick_phase_says_nothing(clock):
    log = io.StringIO()
    with bar(Progress(stream=log), "vocabulary", total=5) as display:
        clock.now += 0.5
        display.update(5)
    assert log.getvalue() == ""


def test_values_set_on_the_display_follow_the_rate(clock):
    log = io.StringIO()
    with bar(Progress(interval=10, stream=log), "epoch 1/3", total=100, unit="cap") as display:
        display.set_postfix(loss="2.310")
        clock.now += 10
        display.update(50)
    assert log.getvalue().splitlines()[0] == (
        "epoch 1/3: 50/100 cap (50%), 5.0 cap/s, 0:10 left, loss=2.310"
    )


def test_on_a_terminal_the_tqdm_bar_is_drawn():
    terminal = Terminal()
    with bar(Progress(stream=terminal), "extract", total=10, unit="img") as display:
        display.update(10)
    assert "\r" in terminal.getvalue() and "10/10" in terminal.getvalue()


def test_progress_not_asked_for_shows_nothing(capsys):
    with bar(False, "extract", total=10) as display:
        display.update(10)
    assert capsys.readouterr().err == ""


def test_the_interval_reaches_the_library_from_the_option_or_the_environment(tmp_path, monkeypatch):
    given = []

    def write_synthetic_dataset(*args, progress, **kwargs):
        given.append(progress)
        return tmp_path / "captions.json"

    monkeypatch.setattr(demo_commands, "write_synthetic_dataset", write_synthetic_dataset)
    runner = CliRunner()
    synth = ["synth", "--out", str(tmp_path), "--images", "3"]
    assert runner.invoke(main, synth).exit_code == 0
    monkeypatch.setenv("CAPTIONER_PROGRESS_INTERVAL", "5")
    assert runner.invoke(main, synth).exit_code == 0
    assert runner.invoke(main, [*synth, "--progress-interval", "0.5"]).exit_code == 0
    assert [p.interval for p in given] == [30, 5, 0.5]
    refused = runner.invoke(main, [*synth, "--progress-interval", "0"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "Invalid value for '--progress-interval'" in refused.output


@pytest.fixture
def slow_clock(monkeypatch) -> FakeClock:
    """A clock by which every phase takes long enough to be reported."""
    fake = FakeClock(tick=1.0)
    monkeypatch.setattr(progress_module, "_now", fake)
    monkeypatch.setattr(progress_module, "_last_line_at", fake.now)
    return fake


def test_a_log_of_synth_and_extract_holds_plain_lines_only(tmp_path, slow_clock):
    runner = CliRunner()
    data, store = tmp_path / "shapes", tmp_path / "s.zarr"
    synth = runner.invoke(main, ["synth", "--out", str(data), "--images", "12"])
    assert synth.exit_code == 0, synth.output
    options = ["--encoder", "tiny", "--weights", "none", "--image-size", "64", "--workers", "0"]
    captions = str(data / "dataset_shapes.json")
    extract = runner.invoke(
        main,
        ["extract", "--captions", captions, "--images", str(data), "--out", str(store), *options],
    )
    assert extract.exit_code == 0, extract.output
    log = synth.stderr + extract.stderr
    assert "\r" not in log
    assert "synth: 12/12 img in " in log and "extract: 12/12 img in " in log


def test_every_phase_of_training_and_evaluation_ends_with_a_plain_line(tmp_path, slow_clock):
    store = make_store(tmp_path / "s.zarr", images=24, seed=0)
    runner = CliRunner()
    sizes = ["--embed-size", "8", "--hidden-size", "8", "--attention-size", "4", "--min-count", "1"]
    common = ["--features", str(store), "--model", "show-tell", "--epochs", "1", *sizes]
    trained = runner.invoke(main, ["train", *common, "--out", str(tmp_path / "ce")])
    assert trained.exit_code == 0, trained.output
    best = str(tmp_path / "ce" / "best.pt")
    scst = ["--objective", "scst", "--init", best, "--out", str(tmp_path / "scst")]
    tuned = runner.invoke(main, ["train", *common, *scst])
    assert tuned.exit_code == 0, tuned.output
    evaluation = ["--checkpoint", best, "--features", str(store), "--out", str(tmp_path / "e")]
    evaluated = runner.invoke(main, ["evaluate", *evaluation, "--metrics", "nltk-fallback"])
    assert evaluated.exit_code == 0, evaluated.output
    log = trained.stderr + tuned.stderr + evaluated.stderr
    assert "\r" not in log
    ends = [line.split(":")[0] for line in log.splitlines() if re.search(r" in \d+:\d\d, ", line)]
    assert ends == [
        *("store's captions", "vocabulary", "feature statistics"),  # cross entropy
        *("CIDEr-D document frequencies", "epoch 1/1", "validating"),  # (the val split's)
        *("store's captions", "CIDEr-D document frequencies", "CIDEr-D document frequencies"),
        *("validating", "epoch 1/1", "validating"),  # SCST: its start, its epoch
        *("store's captions", "decoding", "scoring", "report"),  # evaluation
    ]


def test_a_phase_ended_by_an_error_leaves_the_error_alone(clock):
    log = io.StringIO()
    with pytest.raises(ValueError):
        for _ in tracked(range(5), Progress(stream=log), "reading captions"):
            raise ValueError("bad line")
    assert log.getvalue() == ""


def test_a_logs_first_line_is_due_one_interval_after_the_process_started_not_after_imports():
    script = (
        "import time; started = time.monotonic(); time.sleep(1.5)\n"
        "import captioner.progress as progress; print(started - progress._last_line_at)"
    )
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert 0 <= float(output) < 1.0  # the process began just before `started`, not 1.5 s after
