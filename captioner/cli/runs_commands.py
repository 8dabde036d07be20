"""`captioner runs`: training runs compared in one table and one figure."""

from __future__ import annotations

from pathlib import Path

import click

from captioner.cli.options import PATH, field_option
from captioner.training.runs import RunsConfig, compare_runs, format_runs


@click.command("runs")
@click.argument("runs", nargs=-1, required=True, type=PATH)
@field_option(
    RunsConfig,
    "out",
    PATH,
    "PNG of the runs' validation curves on shared axes.",
)
def runs_command(runs: tuple[Path, ...], out: Path) -> None:
    """Compare training runs (output folders of `captioner train`, e.g. runs/*): model, sizes,
    objective, epochs, best epoch, best val BLEU-4 (and CIDEr-D where recorded), speed, time,
    and whether the run failed (where and why are said below the table)."""
    summaries, skipped = compare_runs(RunsConfig(list(runs), out))
    click.echo(format_runs(summaries))
    for run in summaries:
        if run.failure:
            click.echo(run.describe_failure())
    for note in skipped:
        click.echo(f"skipped {note}")
    click.echo(f"validation curves: {out}")
