"""Every command against every bad input that applies to it: a missing file, a folder where a
file belongs (and a file where a folder does), an empty file, a file of another format, an
unwritable --out, a truncated checkpoint, and a store of another kind.

Each case must end in exit status 1 with one line, `Error: ...`, that names the bad path, no
traceback, and nothing already written changed or gone: the whole shared workspace (a store, a
checkpoint, earlier outputs) is compared before and after. The thin scripts (train_decoder.py,
extract_features.py, evaluate.py) run their cases through the same click objects they call.

Tests run as root, for whom a read-only folder (chmod) is writable, so an unwritable --out is made
in two other ways: a path below a regular file (no one can make a folder there), and a path in
/sys, where the kernel refuses new files to every user (the cases skip where it does not).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner, Result
from factories import make_store
from inference_factories import make_checkpoint
from PIL import Image

from captioner import files as files_module
from captioner.cli import main, runs_commands, script
from captioner.errors import CaptionerError

SCRIPTS = {"train": "train_decoder.py", "extract": "extract_features.py", "evaluate": "evaluate.py"}


@dataclass(frozen=True)
class Workspace:
    """What the commands are given: good inputs, earlier outputs that must survive, bad inputs."""

    root: Path
    store: Path  # a complete feature store
    checkpoint: Path  # an attention decoder trained on it
    captions: Path  # a caption CSV (image,caption,split) of the pictures in `images`
    images: Path
    predictions: Path  # another system's captions of the test images
    run: Path  # a training run: metrics.jsonl, best.pt, last.pt
    evaluation: Path  # an earlier evaluation's folder (metrics.json)
    captions_out: Path  # an earlier `caption` output
    # bad inputs
    missing: Path
    folder: Path  # an empty folder
    empty: Path  # an empty file
    picture: Path  # a JPEG, where captions, a checkpoint or predictions belong
    truncated: Path  # the checkpoint cut short, as an interrupted copy leaves it
    other_group: Path  # a Zarr group that is not a feature store
    other_store: Path  # a store extracted with other encoder weights than the checkpoint's
    cut_run: Path  # a run whose last.pt is truncated
    damaged_run: Path  # a run whose best.pt is truncated
    under_a_file: Path  # no folder can be made here: its parent is a regular file
    system: Path | None  # a path in /sys (None where this machine lets a file be made there)

    @property
    def cut_last(self) -> Path:
        return self.cut_run / "last.pt"

    @property
    def damaged_best(self) -> Path:
        return self.damaged_run / "best.pt"

    @property
    def new_csv(self) -> Path:
        return self.root / "new.csv"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("workspace")
    store = make_store(root / "s.zarr", images=8, channels=16)
    checkpoint = make_checkpoint(root / "best.pt", store)
    images = root / "images"
    images.mkdir()
    rows = ["image,caption,split"]
    for number, split in enumerate(["train"] * 4 + ["val", "val", "test", "test"]):
        Image.new("RGB", (40, 40), (30 * number, 90, 160)).save(images / f"{number}.jpg")
        rows += [f"{number}.jpg,a red circle,{split}", f"{number}.jpg,a blue square,{split}"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    (root / "predictions.csv").write_text("image,caption\n6.jpg,a red circle\n7.jpg,a square\n")
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_bleu4": 0.1}) + "\n")
    for name in ("best.pt", "last.pt"):
        shutil.copy(checkpoint, run / name)
    evaluation = root / "evaluation"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text('{"BLEU-4": 0.25}\n')
    captions_out = root / "captions_out.csv"
    captions_out.write_text("path,caption,log_prob,error\n/a/b.jpg,a dog,-2.0000,\n")
    (root / "folder").mkdir()
    (root / "empty.txt").write_text("")
    Image.new("RGB", (20, 20)).save(root / "picture.jpg")
    truncated = root / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    zarr.open_group(str(root / "other.zarr"), mode="w").attrs["made_by"] = "another tool"
    make_store(root / "other_weights.zarr", images=8, channels=16, seed=3)
    for name, damaged in (("cut_run", "last.pt"), ("damaged_run", "best.pt")):
        shutil.copytree(run, root / name)
        (root / name / damaged).write_bytes(truncated.read_bytes())
    (root / "regular.txt").write_text("a file, not a folder")
    return Workspace(
        root,
        store,
        checkpoint,
        root / "captions.csv",
        images,
        root / "predictions.csv",
        run,
        evaluation,
        captions_out,
        root / "missing.txt",
        root / "folder",
        root / "empty.txt",
        root / "picture.jpg",
        truncated,
        root / "other.zarr",
        root / "other_weights.zarr",
        root / "cut_run",
        root / "damaged_run",
        root / "regular.txt" / "out",
        _system_path(),
    )


def _system_path() -> Path | None:
    """A path in /sys when no file can be made there (sysfs refuses; a container mounts it
    read-only), else None."""
    try:
        descriptor, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys/captioner-test")
    os.close(descriptor)
    os.unlink(probe)
    return None


@dataclass(frozen=True)
class Case:
    """A command line (without the program) and the workspace input its one-line error must
    name."""

    arguments: Callable[[Workspace], list]
    named: str  # a Workspace attribute


def case(id: str, arguments: Callable[[Workspace], list], named: str) -> pytest.param:
    return pytest.param(Case(arguments, named), id=id)


def extract(w: Workspace, captions=None, images=None, out=None) -> list:
    out = out or w.root / "new.zarr"
    captions, images = captions or w.captions, images or w.images
    options = ["--encoder", "tiny", "--weights", "none", "--image-size", "64"]
    return ["extract", "--captions", captions, "--images", images, "--out", out, *options]


def train(w: Workspace, features=None, out=None, *more) -> list:
    out = out or w.root / "new_run"
    return ["train", "--features", features or w.store, "--out", out, "--device", "cpu", *more]


def scst(w: Workspace, init: Path, features=None) -> list:
    return train(w, features, None, "--objective", "scst", "--init", init)


def evaluate(w: Workspace, checkpoint=None, features=None, out=None) -> list:
    checkpoint, features = checkpoint or w.checkpoint, features or w.store
    out = out or w.evaluation
    options = ["--metrics", "nltk-fallback", "--device", "cpu"]
    return ["evaluate", "--checkpoint", checkpoint, "--features", features, "--out", out, *options]


def score(w: Workspace, predictions=None, captions=None, out=None) -> list:
    predictions, captions = predictions or w.predictions, captions or w.captions
    out = out or w.evaluation
    options = ["--metrics", "nltk-fallback"]
    return ["score", "--predictions", predictions, "--captions", captions, "--out", out, *options]


def caption(w: Workspace, inputs=None, checkpoint=None, out=None, html=None) -> list:
    inputs, checkpoint = inputs or w.images, checkpoint or w.checkpoint
    out, page = out or w.captions_out, ["--html", html] if html else []
    return ["caption", inputs, "--checkpoint", checkpoint, "--out", out, "--device", "cpu", *page]


def runs(w: Workspace, folder=None, out=None) -> list:
    return ["runs", folder or w.run, "--out", out or w.root / "runs.png"]


def each(prefix: str, build: Callable[[Workspace, Path], list], kinds: list[str]) -> list:
    """One case per kind of bad input: `build` puts the workspace's input of that kind where
    the case tests it; the error must name that input."""
    return [
        case(f"{prefix}-{kind}", lambda w, kind=kind: build(w, getattr(w, kind)), kind)
        for kind in kinds
    ]


NOT_A_FILE = ["missing", "folder", "empty", "picture"]  # where a file of ours belongs
NOT_A_CHECKPOINT = [*NOT_A_FILE, "truncated"]
NOT_A_STORE = ["missing", "folder", "empty", "picture", "other_group"]
UNWRITABLE = ["under_a_file", "system"]

CASES = [
    *each("inspect", lambda w, bad: ["inspect", bad], NOT_A_FILE),
    *each("extract-captions", lambda w, bad: extract(w, captions=bad), NOT_A_FILE),
    *each("extract-images", lambda w, bad: extract(w, images=bad), ["missing", "picture"]),
    *each("extract-out", lambda w, bad: extract(w, out=bad), [*UNWRITABLE, "empty"]),
    # a store of another kind, or one made with other settings: refused, and left as it was
    *each("extract-out", lambda w, bad: extract(w, out=bad), ["other_group", "store"]),
    *each("features-info", lambda w, bad: ["features", "info", bad], NOT_A_STORE),
    *each("features-verify", lambda w, bad: ["features", "verify", bad], NOT_A_STORE),
    *each("train-features", lambda w, bad: train(w, features=bad), NOT_A_STORE),
    *each("train-out", lambda w, bad: train(w, out=bad), [*UNWRITABLE, "empty", "run"]),
    *each("train-init", lambda w, bad: scst(w, init=bad), NOT_A_CHECKPOINT),
    *each("train-captions", lambda w, bad: train(w, None, None, "--captions", bad), NOT_A_FILE),
    case("train-resume-truncated", lambda w: train(w, None, w.cut_run, "--resume"), "cut_last"),
    # an --init trained on another store
    case("train-init-other-store", lambda w: scst(w, w.checkpoint, w.other_store), "checkpoint"),
    *each("evaluate-checkpoint", lambda w, bad: evaluate(w, checkpoint=bad), NOT_A_CHECKPOINT),
    *each("evaluate-features", lambda w, bad: evaluate(w, features=bad), NOT_A_STORE),
    # a store of other encoder weights than the checkpoint was trained on
    *each("evaluate-features", lambda w, bad: evaluate(w, features=bad), ["other_store"]),
    *each("evaluate-out", lambda w, bad: evaluate(w, out=bad), [*UNWRITABLE, "empty"]),
    *each("score-predictions", lambda w, bad: score(w, predictions=bad), NOT_A_FILE),
    *each("score-captions", lambda w, bad: score(w, captions=bad), NOT_A_FILE),
    *each("score-out", lambda w, bad: score(w, out=bad), [*UNWRITABLE, "empty"]),
    *each("caption-inputs", lambda w, bad: caption(w, inputs=bad), ["missing", "folder"]),
    *each("caption-checkpoint", lambda w, bad: caption(w, checkpoint=bad), NOT_A_CHECKPOINT),
    *each("caption-out", lambda w, bad: caption(w, out=bad), [*UNWRITABLE, "folder"]),
    # another kind of CSV, and the captions of an earlier model (that does not say which)
    *each("caption-out", lambda w, bad: caption(w, out=bad), ["predictions", "captions_out"]),
    *each("caption-html", lambda w, bad: caption(w, out=w.new_csv, html=bad), UNWRITABLE),
    *each("runs", lambda w, bad: runs(w, folder=bad), ["missing", "folder", "picture"]),
    case("runs-damaged-run", lambda w: runs(w, folder=w.damaged_run), "damaged_best"),
    *each("runs-out", lambda w, bad: runs(w, out=bad), ["under_a_file", "folder"]),
]  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root`: its path relative to `root` and its bytes."""
    files = (path for path in sorted(root.rglob("*")) if path.is_file())
    return {str(path.relative_to(root)): path.read_bytes() for path in files}


def assert_refused(result: Result, named: Path, before: dict[str, bytes], root: Path) -> None:
    lines = result.output.strip().splitlines()
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and str(named) in lines[0], lines[0]
    after = snapshot(root)
    assert {name: after.get(name) for name in before} == before  # nothing changed or gone


def run_case(workspace: Workspace, bad: Case, through_script: bool) -> None:
    arguments = [str(argument) for argument in bad.arguments(workspace)]
    named = getattr(workspace, bad.named)
    if named is None:
        pytest.skip("this machine lets a file be made in /sys")
    before = snapshot(workspace.root)
    if through_script:
        command, *arguments = arguments
        result = CliRunner().invoke(script(command), arguments, prog_name=SCRIPTS[command])
    else:
        result = CliRunner().invoke(main, arguments)
    assert_refused(result, named, before, workspace.root)


@pytest.mark.parametrize("bad", CASES)
def test_a_bad_input_is_one_line_that_names_it_and_loses_nothing(workspace, bad):
    run_case(workspace, bad, through_script=False)


@pytest.mark.parametrize("bad", [case for case in CASES if case.id.split("-")[0] in SCRIPTS])
def test_the_scripts_refuse_the_same_way(workspace, bad):
    run_case(workspace, bad, through_script=True)


@pytest.mark.parametrize(("command", "name"), SCRIPTS.items())
def test_usage_lines_name_the_scripts_as_typed(command, name):
    result = CliRunner().invoke(script(command), ["--help"], prog_name=name)
    assert result.exit_code == 0 and result.output.startswith(f"Usage: {name} [OPTIONS]\n")
    wrong = CliRunner().invoke(script(command), ["--no-such-option"], prog_name=name)
    assert wrong.exit_code == 2 and f"Try '{name} --help' for help." in wrong.output


# ---- faults of the machine: named in the user's words, with the hint that fits the command ----


def disk_refusing_temporary_files(error_number: int, name: str = "") -> Callable:
    """`open` for captioner.files in which writing a temporary file (an atomic write's
    `.NAME.PID.tmp`, of `name` only if given) fails as a full disk, a denied folder or a
    read-only disk would."""

    def refusing(path, mode="r", *args, **kwargs):
        temporary = Path(path).name.endswith(".tmp") and Path(path).name.startswith(f".{name}")
        if temporary and "w" in mode:
            raise OSError(error_number, os.strerror(error_number), str(path))
        return open(path, mode, *args, **kwargs)

    return refusing


@pytest.mark.parametrize(
    "fault", [errno.ENOSPC, errno.EACCES, errno.EROFS], ids=errno.errorcode.get
)
def test_a_write_fault_names_the_output_and_does_not_promise_a_resume_it_lacks(
    workspace, tmp_path, monkeypatch, fault
):
    monkeypatch.setattr(files_module, "open", disk_refusing_temporary_files(fault), raising=False)
    out = tmp_path / "runs.png"
    result = CliRunner().invoke(main, ["runs", str(workspace.run), "--out", str(out)])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith(f"Error: {out}: {os.strerror(fault)}; ")
    assert ".tmp" not in last and last.endswith("then run the same command again")
    assert not out.exists()


def test_training_stopped_at_its_first_checkpoint_is_told_to_resume_and_can(
    workspace, tmp_path, monkeypatch
):
    """A full disk at the first best.pt, before any last.pt: the hint says --resume, and the
    resumed run, having nothing saved to go on from, starts again."""
    refusing = disk_refusing_temporary_files(errno.ENOSPC, "best.pt")
    monkeypatch.setattr(files_module, "open", refusing, raising=False)
    out = tmp_path / "run"
    small = ["--epochs", "1", "--embed-size", "8", "--hidden-size", "8", "--attention-size", "4"]
    small += ["--min-count", "1", "--batch-size", "4", "--workers", "0"]
    result = CliRunner().invoke(main, train(workspace, None, out, *small))
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith(f"Error: {out / 'best.pt'}: No space left")
    assert last.endswith("then run the same command with --resume: it goes on from its last save")
    monkeypatch.undo()
    resumed = CliRunner().invoke(main, train(workspace, None, out, *small, "--resume"))
    assert resumed.exit_code == 0 and "it starts again" in resumed.output, resumed.output
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()


def test_warnings_are_one_plain_line_each_once(workspace, monkeypatch):
    """As notes are shown: `warning: ...` on one line, without the file, line number and line of
    source Python's own display adds, and a repeated warning once."""

    def warn_and_refuse(config):
        for _ in range(2):
            warnings.warn("random weights:\n  captions will be meaningless", stacklevel=1)
        raise CaptionerError("done")

    monkeypatch.setattr(runs_commands, "compare_runs", warn_and_refuse)
    result = CliRunner().invoke(main, ["runs", str(workspace.run)])
    assert result.output.splitlines() == [
        "warning: random weights: captions will be meaningless",
        "Error: done",
    ]
