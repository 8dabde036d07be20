"""Command-line options defined by the configuration dataclasses they fill."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import click

from captioner.precision import PRECISIONS
from captioner.progress import DEFAULT_INTERVAL, Progress

PATH = click.Path(path_type=Path)  # a file or folder given on the command line, as a Path
PROGRESS_INTERVAL_VARIABLE = "CAPTIONER_PROGRESS_INTERVAL"


def store_option(*names: str, **settings) -> Callable:
    """An option naming a feature store: a folder, or a URL in object storage (s3://...), kept
    as text for `store_location`."""
    return click.option(*names, type=str, **settings)


storage_options_option = click.option(
    "--storage-options",
    metavar="JSON",
    help="For a store in object storage: fsspec options as a JSON object, e.g."
    ' \'{"endpoint_url": "http://minio:9000", "profile": "lab"}\'. Credentials and endpoints'
    " otherwise come from the usual places (AWS_* variables, ~/.aws).",
)
cache_option = click.option(
    "--cache",
    type=PATH,
    metavar="DIR",
    help="For a store in object storage: keep every feature shard fetched in DIR (checked"
    " against its checksum), so later epochs and runs read it from the local disk.",
)


def features_options(help: str) -> Callable:
    """--features (the store a command reads), with --storage-options and --cache for a store
    in object storage."""

    def decorate(command: Callable) -> Callable:
        required = store_option("--features", required=True, help=help)
        return apply_options(command, [required, storage_options_option, cache_option])

    return decorate


def path_option(*names: str, **settings) -> Callable:
    """An option that takes a file or folder (`click.option` with type PATH); `--help` shows its
    default, if it has one."""
    settings.setdefault("show_default", "default" in settings)
    return click.option(*names, type=PATH, **settings)


def field_option(config_class: type, name: str, kind: click.ParamType | type, help: str):
    """``--name`` with the default of `config_class`'s field `name`, so the two never disagree."""
    defaults = {field.name: field.default for field in dataclasses.fields(config_class)}
    return click.option(
        f"--{name.replace('_', '-')}",
        name,
        type=kind,
        default=defaults[name],
        show_default=True,
        help=help,
    )


def apply_options(command: Callable, options: list[Callable]) -> Callable:
    """`command` decorated by `options` in order (the first listed shows first in --help)."""
    for option in reversed(options):
        command = option(command)
    return command


def progress_option(command: Callable) -> Callable:
    """--progress-interval (default from CAPTIONER_PROGRESS_INTERVAL, else 30 s), handed to the
    command as `progress`: how the library shows its progress."""

    def to_progress(ctx: click.Context, param: click.Parameter, seconds: float) -> Progress:
        return Progress(interval=seconds)

    return click.option(
        "--progress-interval",
        "progress",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULT_INTERVAL,
        envvar=PROGRESS_INTERVAL_VARIABLE,
        show_default=True,
        show_envvar=True,
        metavar="SECONDS",
        callback=to_progress,
        help="When stderr is not a terminal (a batch log), show progress as one plain line this"
        " often and at the end of each phase, instead of progress bars.",
    )(command)


def precision_option(config_class: type) -> Callable:
    """--precision, with `config_class`'s default."""
    return field_option(
        config_class,
        "precision",
        click.Choice(PRECISIONS),
        "auto: bfloat16 autocast where the device multiplies it faster than float32 (CUDA, CPUs"
        " with AMX; per decoder in training), else float32. The run's first lines say which.",
    )
