"""Every command's library entry point refuses a bad option value before any work, in one line
that names the option as the command line spells it and says what it accepts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captioner.devices import available_cpus, default_workers
from captioner.errors import CaptionerError
from captioner.extraction.extract import ExtractConfig, extract_features
from captioner.inference.caption import CaptionConfig, caption_images
from captioner.inference.evaluate import EvaluateConfig, evaluate
from captioner.option_checks import at_least, check_options, fraction, one_of, optional
from captioner.training import TrainConfig, train

NOWHERE = Path("does-not-exist")


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (lambda: train(TrainConfig(NOWHERE, NOWHERE, batch_size=0)), "--batch-size: 0"),
        (lambda: train(TrainConfig(NOWHERE, NOWHERE, dropout=1.0)), "--dropout: 1.0"),
        (lambda: train(TrainConfig(NOWHERE, NOWHERE, objective="rl")), "--objective: 'rl'"),
        (lambda: evaluate(EvaluateConfig(NOWHERE, NOWHERE, NOWHERE, visualize=-1)), "--visualize"),
        (lambda: caption_images(CaptionConfig([NOWHERE], NOWHERE, NOWHERE, format="xls")),
         "--format: 'xls' is not valid; it must be one of csv, jsonl"),
        (lambda: extract_features(ExtractConfig([NOWHERE], NOWHERE, NOWHERE, limit=0)),
         "--limit: 0 is not valid; it must be at least 1 (or unset)"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_before_any_file_is_touched(run, expected):
    with pytest.raises(CaptionerError) as refused:
        run()
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_rules():
    assert at_least(1).holds(1) and not at_least(1).holds(0)
    assert fraction().holds(0.0) and not fraction().holds(1.0)
    assert one_of(["a", "b"]).holds("b") and not one_of(["a", "b"]).holds("c")
    assert optional(at_least(0)).holds(None) and not optional(at_least(0)).holds(-1)
    check_options(TrainConfig(NOWHERE, NOWHERE), {"epochs": at_least(1)})  # accepted: no error


def test_default_worker_processes_never_outnumber_the_cpus_available(monkeypatch):
    """PyTorch warns when a DataLoader has more worker processes than the CPUs the process may
    use (a container's or a job's share, not the machine's count)."""
    assert ExtractConfig([], NOWHERE, NOWHERE).workers <= available_cpus()
    assert CaptionConfig([], NOWHERE, NOWHERE).workers <= available_cpus()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert available_cpus() == 1 and default_workers(4) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers(4) == 4
