"""Training runs side by side: one table of what each run is and reached, and one figure of their
validation curves on shared axes (`captioner runs runs/*`).

A run is a training output folder. Each epoch's figures come from its metrics.jsonl; what the
decoder is (model, sizes) and how it was trained (the objective, "xe" unless the run recorded
another) from its checkpoint, best.pt or else last.pt, opened like every checkpoint with
``torch.load(weights_only=True)``. The best epoch is the one best.pt holds, so it follows
whatever criterion training chose it by. A run that stopped because its numbers stopped being
finite ends its metrics.jsonl with a failure row (captioner.training.divergence): it is listed as
failed, with where and why. Values that were not finite are null in metrics.jsonl (NaN in files
of older runs): they show as "-" and are left out of the curves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from captioner import visualize
from captioner.checkpoint import Checkpoint, load_checkpoint
from captioner.errors import CaptionerError
from captioner.files import require_writable_file
from captioner.models import DecoderConfig
from captioner.training.config import SELECTION_METRIC
from captioner.training.divergence import FAILED

METRICS_FILE = "metrics.jsonl"
DEFAULT_OBJECTIVE = "xe"  # runs from before training recorded an objective were all xe


@dataclass
class RunsConfig:
    runs: list[Path]  # training output folders
    out: Path = Path("runs.png")  # the figure of their validation curves


@dataclass
class RunSummary:
    path: Path
    history: list[dict]  # the epochs' metrics.jsonl rows
    model: str  # "?" where the run has no checkpoint yet
    sizes: str  # e.g. "emb 512 hid 512 att 512", "d 512 layers 3 heads 8 ff 2048"
    vocabulary: int | None
    objective: str
    best_epoch: int | None  # None when no epoch was finished
    failure: dict | None = None  # the failure row a failed run's metrics.jsonl ends with

    @property
    def best_row(self) -> dict:
        return next((row for row in self.history if row["epoch"] == self.best_epoch), {})

    def describe_failure(self) -> str:
        """Where and why the run failed ("" for a run that did not)."""
        if self.failure is None:
            return ""
        step = self.failure.get("step")
        where = f"epoch {self.failure['epoch']}" + (f" step {step}" if step else "")
        return f"{self.path}: failed at {where}: {self.failure[FAILED]}"

    @property
    def captions_per_second(self) -> float | None:
        """Over all epochs, each weighted by its time."""
        timed = [(row.get("captions_per_s"), row.get("seconds")) for row in self.history]
        timed = [(rate, seconds) for rate, seconds in timed if rate and seconds]
        total = sum(seconds for _, seconds in timed)
        return sum(rate * seconds for rate, seconds in timed) / total if total else None

    @property
    def seconds(self) -> float:
        """Time spent training, all epochs together (validation not counted)."""
        return sum(row.get("seconds") or 0.0 for row in self.history)


def compare_runs(config: RunsConfig) -> tuple[list[RunSummary], list[str]]:
    """The runs among `config.runs`, and a note for each folder left out because it holds no
    metrics yet (not a run, or one before its first epoch); writes the figure to `config.out`.
    CaptionerError when no folder is a run, or a run's files are damaged."""
    require_writable_file(config.out)
    runs, skipped = [], []
    for path in map(Path, config.runs):
        if (path / METRICS_FILE).is_file():
            runs.append(read_run(path))
        else:
            skipped.append(f"{path}: no {METRICS_FILE} (not a training run, or not one epoch yet)")
    if not runs:
        raise CaptionerError(
            f"{', '.join(map(str, config.runs))}: no training run there (none holds {METRICS_FILE})"
        )
    visualize.save_run_comparison(config.out, {str(run.path): run.history for run in runs})
    return runs, skipped


def read_run(path: Path) -> RunSummary:
    """What the run in folder `path` is and reached."""
    rows = _read_history(path / METRICS_FILE)
    history = [row for row in rows if FAILED not in row]
    failure = next((row for row in rows if FAILED in row), None)
    best = _checkpoint(path / "best.pt")
    checkpoint = best or _checkpoint(path / "last.pt")
    if checkpoint is None:
        best_epoch = _best_epoch(None, history, DEFAULT_OBJECTIVE)
        return RunSummary(path, history, "?", "?", None, DEFAULT_OBJECTIVE, best_epoch, failure)
    objective = checkpoint.training.get("options", {}).get("objective", DEFAULT_OBJECTIVE)
    decoder = checkpoint.decoder_config
    return RunSummary(
        path,
        history,
        decoder.model,
        describe_sizes(decoder),
        decoder.vocab_size,
        objective,
        _best_epoch(best, history, objective),
        failure,
    )


def describe_sizes(decoder: DecoderConfig) -> str:
    """The sizes that make the decoder what it is, each named."""
    if decoder.model == "transformer":
        encoder = f" enc {decoder.encoder_layers}" if decoder.encoder_layers else ""
        return (
            f"d {decoder.hidden_size} layers {decoder.decoder_layers} heads {decoder.heads}"
            f" ff {decoder.ff_size}{encoder}"
        )
    attention = f" att {decoder.attention_size}" if decoder.model == "show-attend-tell" else ""
    return f"emb {decoder.embed_size} hid {decoder.hidden_size}{attention}"


def format_runs(runs: list[RunSummary]) -> str:
    """The runs as a plain-text table, one line each."""
    header = (
        "run",
        "model",
        "sizes",
        "vocab",
        "objective",
        "epochs",
        "best",
        "val BLEU-4",
        "val CIDEr-D",
        "captions/s",
        "train time",
        "status",
    )
    lines = [header]
    for run in runs:
        best = run.best_row
        lines.append(
            (
                str(run.path),
                run.model,
                run.sizes,
                _text(run.vocabulary),
                run.objective,
                str(run.history[-1]["epoch"] if run.history else 0),  # (SCST's start at 0)
                _text(run.best_epoch),
                _text(best.get("val_bleu4"), ".4f"),
                _text(best.get("val_cider"), ".4f"),
                _text(run.captions_per_second, ".0f"),
                _duration(run.seconds),
                "failed" if run.failure else "ok",
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if column < 5 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def _read_history(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise CaptionerError(f"{path}:{number}: not a JSON line ({error})") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise CaptionerError(f"{path}:{number}: not a metrics row (no epoch number)")
        rows.append(row)
    if not rows:
        raise CaptionerError(f"{path}: no epochs in it")
    return rows


def _checkpoint(path: Path) -> Checkpoint | None:
    return load_checkpoint(path)[0] if path.is_file() else None


def _best_epoch(best: Checkpoint | None, history: list[dict], objective: str) -> int | None:
    """The epoch best.pt was saved at; without it, the first epoch of the best value of what
    training selects by for `objective` (val BLEU-4, or CIDEr-D for SCST); None without epochs."""
    if not history:
        return None
    if best is not None:
        epoch = best.training.get("metrics", {}).get("epoch")
        if any(row["epoch"] == epoch for row in history):
            return epoch
    metric = SELECTION_METRIC.get(objective, "val_bleu4")
    scored = [row for row in history if math.isfinite(row.get(metric) or math.nan)]
    if not scored:
        return history[-1]["epoch"]
    return max(scored, key=lambda row: (row[metric], -row["epoch"]))["epoch"]


def _text(value: float | int | None, spec: str = "") -> str:
    """The value for the table; "-" where there is none or it is not finite."""
    missing = value is None or (isinstance(value, float) and not math.isfinite(value))
    return "-" if missing else format(value, spec)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
