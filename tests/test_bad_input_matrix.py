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
    other_weights_store: Path  # a store extracted with other encoder weights than the checkpoint's
    cut_run: Path  # a run whose last.pt is truncated
    damaged_run: Path  # a run whose best.pt is truncated
    under_a_file: Path  # no folder can be made here: its parent is a regular file
    system: Path | None  # a path in /sys (None where this machine lets a file be made there)


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
    other_weights = make_store(root / "other_weights.zarr", images=8, channels=16, seed=3)
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
        other_weights,
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
    """A command line (without the program) and the path its one-line error must name: a
    workspace attribute's name, or a function of the workspace."""

    arguments: Callable[[Workspace], list]
    named: str | Callable[[Workspace], Path | None]

    def path_named(self, workspace: Workspace) -> Path | None:
        if isinstance(self.named, str):
            return getattr(workspace, self.named)
        return self.named(workspace)


def case(id: str, arguments: Callable[[Workspace], list], named) -> pytest.param:
    return pytest.param(Case(arguments, named), id=id)


def extract(w: Workspace, captions=None, images=None, out=None) -> list:
    out = out or w.root / "new.zarr"
    captions, images = captions or w.captions, images or w.images
    options = ["--encoder", "tiny", "--weights", "none", "--image-size", "64"]
    return ["extract", "--captions", captions, "--images", images, "--out", out, *options]


def train(w: Workspace, features=None, out=None, *more) -> list:
    out = out or w.root / "new_run"
    return ["train", "--features", features or w.store, "--out", out, "--device", "cpu", *more]


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


def caption(w: Workspace, inputs=None, checkpoint=None, out=None, *more) -> list:
    inputs, checkpoint = inputs or w.images, checkpoint or w.checkpoint
    out = out or w.captions_out
    return ["caption", inputs, "--checkpoint", checkpoint, "--out", out, "--device", "cpu", *more]


def runs(w: Workspace, folder=None, out=None) -> list:
    return ["runs", folder or w.run, "--out", out or w.root / "runs.png"]


CASES = [
    # inspect CAPTIONS
    case("inspect-missing", lambda w: ["inspect", w.missing], "missing"),
    case("inspect-folder", lambda w: ["inspect", w.folder], "folder"),
    case("inspect-empty", lambda w: ["inspect", w.empty], "empty"),
    case("inspect-picture", lambda w: ["inspect", w.picture], "picture"),
    # extract
    case("extract-captions-missing", lambda w: extract(w, captions=w.missing), "missing"),
    case("extract-captions-folder", lambda w: extract(w, captions=w.folder), "folder"),
    case("extract-captions-empty", lambda w: extract(w, captions=w.empty), "empty"),
    case("extract-captions-picture", lambda w: extract(w, captions=w.picture), "picture"),
    case("extract-images-missing", lambda w: extract(w, images=w.missing), "missing"),
    case("extract-images-file", lambda w: extract(w, images=w.picture), "picture"),
    case("extract-out-under-file", lambda w: extract(w, out=w.under_a_file), "under_a_file"),
    case("extract-out-system", lambda w: extract(w, out=w.system), "system"),
    case("extract-out-file", lambda w: extract(w, out=w.empty), "empty"),
    case("extract-out-other-group", lambda w: extract(w, out=w.other_group), "other_group"),
    case("extract-out-other-store", lambda w: extract(w, out=w.store), "store"),
    # features info / verify STORE
    *(
        case(
            f"features-{action}-{kind}",
            lambda w, a=action, k=kind: ["features", a, getattr(w, k)],
            kind,
        )
        for action in ("info", "verify")
        for kind in ("missing", "folder", "empty", "picture", "other_group")
    ),
    # train
    case("train-features-missing", lambda w: train(w, features=w.missing), "missing"),
    case("train-features-file", lambda w: train(w, features=w.picture), "picture"),
    case("train-features-other-group", lambda w: train(w, features=w.other_group), "other_group"),
    case("train-out-under-file", lambda w: train(w, out=w.under_a_file), "under_a_file"),
    case("train-out-system", lambda w: train(w, out=w.system), "system"),
    case("train-out-file", lambda w: train(w, out=w.empty), "empty"),
    case("train-out-holds-a-run", lambda w: train(w, out=w.run), "run"),
    case(
        "train-resume-truncated",
        lambda w: train(w, None, w.cut_run, "--resume"),
        lambda w: w.cut_run / "last.pt",
    ),
    case(
        "train-init-truncated",
        lambda w: train(w, None, None, "--objective", "scst", "--init", w.truncated),
        "truncated",
    ),
    case(
        "train-init-other-store",
        lambda w: train(
            w, w.other_weights_store, None, "--objective", "scst", "--init", w.checkpoint
        ),
        "checkpoint",
    ),
    case("train-captions-empty", lambda w: train(w, None, None, "--captions", w.empty), "empty"),
    # evaluate
    case("evaluate-checkpoint-missing", lambda w: evaluate(w, checkpoint=w.missing), "missing"),
    case("evaluate-checkpoint-folder", lambda w: evaluate(w, checkpoint=w.folder), "folder"),
    case("evaluate-checkpoint-empty", lambda w: evaluate(w, checkpoint=w.empty), "empty"),
    case("evaluate-checkpoint-picture", lambda w: evaluate(w, checkpoint=w.picture), "picture"),
    case(
        "evaluate-checkpoint-truncated", lambda w: evaluate(w, checkpoint=w.truncated), "truncated"
    ),
    case("evaluate-features-missing", lambda w: evaluate(w, features=w.missing), "missing"),
    case(
        "evaluate-features-other-group",
        lambda w: evaluate(w, features=w.other_group),
        "other_group",
    ),
    case(
        "evaluate-features-other-weights",
        lambda w: evaluate(w, features=w.other_weights_store),
        "other_weights_store",
    ),
    case("evaluate-out-under-file", lambda w: evaluate(w, out=w.under_a_file), "under_a_file"),
    case("evaluate-out-system", lambda w: evaluate(w, out=w.system), "system"),
    case("evaluate-out-file", lambda w: evaluate(w, out=w.empty), "empty"),
    # score
    case("score-predictions-missing", lambda w: score(w, predictions=w.missing), "missing"),
    case("score-predictions-folder", lambda w: score(w, predictions=w.folder), "folder"),
    case("score-predictions-empty", lambda w: score(w, predictions=w.empty), "empty"),
    case("score-predictions-picture", lambda w: score(w, predictions=w.picture), "picture"),
    case("score-captions-missing", lambda w: score(w, captions=w.missing), "missing"),
    case("score-captions-empty", lambda w: score(w, captions=w.empty), "empty"),
    case("score-out-under-file", lambda w: score(w, out=w.under_a_file), "under_a_file"),
    case("score-out-system", lambda w: score(w, out=w.system), "system"),
    # caption
    case("caption-inputs-missing", lambda w: caption(w, inputs=w.missing), "missing"),
    case("caption-checkpoint-missing", lambda w: caption(w, checkpoint=w.missing), "missing"),
    case("caption-checkpoint-folder", lambda w: caption(w, checkpoint=w.folder), "folder"),
    case("caption-checkpoint-empty", lambda w: caption(w, checkpoint=w.empty), "empty"),
    case("caption-checkpoint-picture", lambda w: caption(w, checkpoint=w.picture), "picture"),
    case("caption-checkpoint-truncated", lambda w: caption(w, checkpoint=w.truncated), "truncated"),
    case("caption-out-under-file", lambda w: caption(w, out=w.under_a_file), "under_a_file"),
    case(
        "caption-out-system",
        lambda w: caption(w, out=w.system / "c.csv" if w.system else None),
        "system",
    ),
    case("caption-out-folder", lambda w: caption(w, out=w.folder), "folder"),
    case("caption-out-other-format", lambda w: caption(w, out=w.predictions), "predictions"),
    case("caption-out-earlier-model", lambda w: caption(w), "captions_out"),
    case(
        "caption-html-under-file",
        lambda w: caption(w, None, None, w.root / "c.csv", "--html", w.under_a_file),
        "under_a_file",
    ),
    # runs
    case("runs-missing", lambda w: runs(w, folder=w.missing), "missing"),
    case("runs-empty-folder", lambda w: runs(w, folder=w.folder), "folder"),
    case("runs-file", lambda w: runs(w, folder=w.picture), "picture"),
    case(
        "runs-truncated-checkpoint",
        lambda w: runs(w, folder=w.damaged_run),
        lambda w: w.damaged_run / "best.pt",
    ),
    case("runs-out-under-file", lambda w: runs(w, out=w.under_a_file), "under_a_file"),
    case("runs-out-folder", lambda w: runs(w, out=w.folder), "folder"),
]


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def assert_refused(result: Result, named: Path, before: dict[str, bytes], root: Path) -> None:
    lines = result.output.strip().splitlines()
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and str(named) in lines[0], lines[0]
    after = snapshot(root)
    assert {name: after.get(name) for name in before} == before  # nothing changed or gone


def run_case(workspace: Workspace, bad: Case, through_script: bool) -> None:
    arguments = [str(argument) for argument in bad.arguments(workspace)]
    named = bad.path_named(workspace)
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
