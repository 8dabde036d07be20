"""The `captioner` command line. Each command lives in its own module; this file only groups them,
and makes the same commands the programs of the thin scripts (`script`).

Errors a user can cause are raised as `CaptionerError` anywhere in the library and turned into one
line on stderr here, so no command ever shows a traceback for bad input. So are the faults of the
machine that the user must fix (a full disk, a folder it may not write to), with what to do after
the fix: the commands that resume say how to resume (every command writes atomically, so nothing
finished is lost). Warnings are one line as well, `warning: ...`, shown the way notes are.
"""

import contextlib
import errno
import io
import sys
import warnings
from collections.abc import Callable, Iterator

import click

from captioner import __version__
from captioner.cli.corpus_commands import inspect
from captioner.cli.demo_commands import demo, synth
from captioner.cli.extract_commands import extract, features
from captioner.cli.inference_commands import caption_command, evaluate_command, score_command
from captioner.cli.runs_commands import runs_command
from captioner.cli.train_commands import train_command
from captioner.errors import CaptionerError
from captioner.progress import write

# OSErrors whose cause is outside the program: said in one line, never as a traceback.
_MACHINE_FAULTS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota exceeded)",
    errno.EACCES: "let this user read and write there",
    errno.EPERM: "let this user read and write there",
    errno.EROFS: "write to a writable disk",
}
# What to do after the fix, for the commands that keep their finished work and go on from it.
_RESUMING = {
    "train": "run the same command with --resume: it goes on from its last save",
    "extract": "run the same command again: it keeps the finished shards and extracts the rest",
    "caption": "run the same command again: it keeps the rows written and captions the rest",
    "demo": "run it again: it reuses every finished phase",
}
_AGAIN = "run the same command again"


def _one_line(error: CaptionerError | OSError, command: str | None) -> click.ClickException:
    """The one line `error` is shown as; a fault that is not the machine's is raised as it is."""
    if isinstance(error, CaptionerError):
        return click.ClickException(str(error))
    if error.errno not in _MACHINE_FAULTS:
        raise error
    where = f"{error.filename}: " if error.filename else ""
    after = _RESUMING.get(command or "", _AGAIN)
    return click.ClickException(
        f"{where}{error.strerror or error}; {_MACHINE_FAULTS[error.errno]}, then {after}"
    )


@contextlib.contextmanager
def _plain_warnings() -> Iterator[None]:
    """Warnings as one line, `warning: MESSAGE`, above any progress bar, each message once: not
    Python's two lines naming the file and quoting the line of source that warned."""
    shown = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if text not in shown:
            shown.add(text)
            write(f"warning: {text}", sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _line_by_line() -> None:
    """Standard output written line by line even to a file or pipe (a batch log), where Python
    would hold it back in blocks: a log then shows each line when it happens, in order with the
    progress lines and warnings on stderr."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


@contextlib.contextmanager
def _as_users_see_it(command: Callable[[], str | None]) -> Iterator[None]:
    """Errors a user can fix and warnings, each as one line; `command`: the command's name."""
    _line_by_line()
    try:
        with _plain_warnings():
            yield
    except (CaptionerError, OSError) as error:
        raise _one_line(error, command()) from None


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        with _as_users_see_it(lambda: ctx.invoked_subcommand):
            return super().invoke(ctx)


class _Script(click.Command):
    """A command run as a program of its own (`python train_decoder.py ...`)."""

    def invoke(self, ctx: click.Context):
        with _as_users_see_it(lambda: self.name):
            return super().invoke(ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="captioner")
def main() -> None:
    """Image captioning from a frozen-CNN feature store."""


for _command in (
    inspect,
    synth,
    demo,
    extract,
    features,
    train_command,
    evaluate_command,
    score_command,
    caption_command,
    runs_command,
):
    main.add_command(_command)


def script(name: str) -> click.Command:
    """`captioner NAME` as the program of a thin script: the same options, errors and warnings,
    and usage lines that name the script as it is typed (`Usage: train_decoder.py [OPTIONS]`,
    not `train_decoder.py train [OPTIONS]`, which would not run)."""
    command = main.commands[name]
    return _Script(
        name=command.name,
        params=command.params,
        callback=command.callback,
        help=command.help,
        context_settings=main.context_settings,
    )
