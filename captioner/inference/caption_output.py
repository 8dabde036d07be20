"""The output of `captioner caption`: a CSV or JSONL file of one row per image, appended to batch
by batch, and beside it a record of the model that made its captions.

Rows are flushed as they are written, and a re-run with the same output skips the files it
already holds, so a killed run resumes without losing or repeating a row (a half-written last
line is cut off and redone). An output holds one model's captions: the record
(``OUT.model.json``: the checkpoint and its sha256, the decoding options, the encoder weights
where they are not the checkpoint's) is written when the output is started, and a run with
another checkpoint or other decoding options into an output that already holds captions is
refused, never skipping its files silently or mixing two models' captions in one file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.files import (
    file_sha256,
    named_after,
    spreadsheet_safe,
    spreadsheet_value,
    write_json,
)
from captioner.models.decode import DecodingConfig

OUTPUT_FORMATS = ("csv", "jsonl")
COLUMNS = ("path", "caption", "log_prob", "error")
RECORD_SUFFIX = ".model.json"
CaptionRow = tuple[str, str, float | None, str | None]  # path, caption, log_prob, error


@dataclass(frozen=True)
class CaptionModel:
    """What decides an output's captions. The checkpoint is identified by its file's sha256 (its
    path is kept to name it: a checkpoint moved elsewhere is the same model)."""

    checkpoint: str
    checkpoint_sha256: str
    decoding: dict  # DecodingConfig.used_options()
    encoder_weights: str = ""  # a weights file used in place of the checkpoint's ("": its own)

    @classmethod
    def of(
        cls, checkpoint: Path, decoding: DecodingConfig, other_weights: str | None = None
    ) -> CaptionModel:
        """The model of a run: `other_weights`, an encoder weights file that may differ from the
        checkpoint's own (None: the checkpoint's)."""
        digest = file_sha256(checkpoint)
        return cls(str(checkpoint), digest, decoding.used_options(), other_weights or "")

    def differences(self, other: CaptionModel) -> list[str]:
        """What differs from `other`, as "what: the value recorded there, `other`'s now"."""
        found = []
        if self.checkpoint_sha256 != other.checkpoint_sha256:
            found.append(f"checkpoint: {self._checkpoint()} there, {other._checkpoint()} now")
        for name, value in self.decoding.items():
            if name in other.decoding and other.decoding[name] != value:
                found.append(f"{name}: {value} there, {other.decoding[name]} now")
        if self.encoder_weights != other.encoder_weights:
            found.append(f"encoder weights: {self._weights()} there, {other._weights()} now")
        return found

    def details(self) -> list[tuple[str, str]]:
        """The model as (what, value) pairs for a page."""
        options = ", ".join(f"{name} {value}" for name, value in self.decoding.items())
        details = [("checkpoint", self._checkpoint()), ("decoding", options)]
        if self.encoder_weights:
            details.append(("encoder weights", self._weights()))
        return details

    def _weights(self) -> str:
        return self.encoder_weights or "the checkpoint's own"

    def _checkpoint(self) -> str:
        return f"{self.checkpoint} (sha256 {self.checkpoint_sha256[:12]})"


class CaptionOutput:
    """The output file: what it already holds, and appending rows to it (flushed per batch)."""

    def __init__(self, path: Path, format: str):
        self.path = path
        self.format = format
        self._file: io.TextIOWrapper | None = None

    @property
    def record_path(self) -> Path:
        """The file beside the output that records the model of its captions."""
        return self.path.with_name(self.path.name + RECORD_SUFFIX)

    def resume(self, model: CaptionModel) -> list[CaptionRow]:
        """The rows already in the output, which `model` is to add to: a half-written last line
        is cut off first (it is redone). A new output (no rows yet) records `model` beside it;
        one whose rows another model or other decoding options made, or whose rows do not say
        what made them (an earlier captioner's output, or one whose record was removed), is
        refused in one line: an output holds one model's captions."""
        if self.path.is_file():
            _cut_partial_last_line(self.path)
        rows = self.rows()
        recorded = self.recorded_model()
        if not rows:
            if recorded != model:
                write_json(self.record_path, asdict(model))
            return rows
        if recorded is None:
            raise CaptionerError(
                f"{self.path}: its {len(rows)} captions do not say which checkpoint and decoding"
                f" options made them (an earlier captioner wrote it, or {self.record_path.name}"
                " was removed); caption into another --out"
            )
        if differences := recorded.differences(model):
            raise CaptionerError(
                f"{self.path}: its {len(rows)} captions were made otherwise"
                f" ({'; '.join(differences)}); an output holds one model's captions: caption"
                " into another --out"
            )
        return rows

    def recorded_model(self) -> CaptionModel | None:
        """The model the record beside the output names; None where there is no record."""
        if not self.record_path.is_file():
            return None
        try:
            return CaptionModel(**json.loads(self.record_path.read_text("utf-8")))
        except (ValueError, TypeError):
            raise CaptionerError(
                f"{self.record_path}: a damaged record of which model made {self.path.name};"
                " caption into another --out"
            ) from None

    def rows(self) -> list[CaptionRow]:
        """The rows in the output, as `write` took them."""
        if not self.path.exists():
            return []
        text = self.path.read_text("utf-8")
        if not text:
            return []
        return self._csv_rows(text) if self.format == "csv" else self._jsonl_rows(text)

    def _csv_rows(self, text: str) -> list[CaptionRow]:
        rows = list(csv.reader(io.StringIO(text)))
        if tuple(rows[0]) != COLUMNS:
            raise CaptionerError(
                f"{self.path}: exists and is not a captions CSV (columns {','.join(COLUMNS)}); "
                "choose another --out"
            )
        parsed = []
        for number, row in enumerate(rows[1:], start=2):
            try:
                path, caption, log_prob, error = (spreadsheet_value(cell) for cell in row)
                parsed.append((path, caption, float(log_prob) if log_prob else None, error or None))
            except ValueError:
                raise CaptionerError(
                    f"{self.path}: line {number} is not a captions CSV row; choose another --out"
                ) from None
        return parsed

    def _jsonl_rows(self, text: str) -> list[CaptionRow]:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                entry = json.loads(line)
                rows.append(
                    (
                        entry["path"],
                        entry.get("caption", ""),
                        entry.get("log_prob"),
                        entry.get("error"),
                    )
                )
            except (ValueError, KeyError, TypeError):
                raise CaptionerError(
                    f"{self.path}: line {number} is not a captions JSONL row; choose another --out"
                ) from None
        return rows

    # A write to a full disk names no file: the errors of the writes below name the output.

    def __enter__(self) -> CaptionOutput:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with named_after(self.path, self.path):
            self._file = open(self.path, "a", encoding="utf-8", newline="")
            if new and self.format == "csv":
                self._file.write(",".join(COLUMNS) + "\n")
        return self

    def __exit__(self, *exc_info) -> None:
        assert self._file is not None
        file, self._file = self._file, None
        with named_after(self.path, self.path), file:
            file.flush()
            os.fsync(file.fileno())

    def write(self, rows: list[CaptionRow]) -> None:
        """Append whole rows and flush, so a killed run loses at most the batch being written."""
        assert self._file is not None
        buffer = io.StringIO()
        if self.format == "csv":
            writer = csv.writer(buffer, lineterminator="\n")
            for path, caption, log_prob, error in rows:
                cells = [path, caption, "" if log_prob is None else f"{log_prob:.4f}", error or ""]
                writer.writerow([spreadsheet_safe(_one_line(cell)) for cell in cells])
        else:
            for path, caption, log_prob, error in rows:
                entry = {"path": path, "caption": caption, "log_prob": log_prob, "error": error}
                buffer.write(json.dumps(entry, ensure_ascii=False) + "\n")
        with named_after(self.path, self.path):
            self._file.write(buffer.getvalue())
            self._file.flush()


def _cut_partial_last_line(path: Path) -> None:
    """Drop bytes after the last newline: the row a killed run was writing (it is redone)."""
    with open(path, "rb+") as file:
        file.seek(0, os.SEEK_END)
        size = file.tell()
        if size == 0:
            return
        file.seek(max(0, size - 1))
        if file.read(1) == b"\n":
            return
        block = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - block)
            file.seek(start)
            newline = file.read(end - start).rfind(b"\n")
            if newline >= 0:
                file.truncate(start + newline + 1)
                return
            end = start
        file.truncate(0)


def _one_line(text: str) -> str:
    """Rows are one line each, which is what makes cutting a half-written row exact."""
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text


def path_key(path: Path) -> str:
    """The absolute path: what rows hold and how files already captioned are recognised."""
    return os.path.abspath(path)
