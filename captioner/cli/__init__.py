"""The `captioner` command line. Each command lives in its own module; this file only groups them.

Errors a user can cause are raised as `CaptionerError` anywhere in the library and turned into one
line on stderr here, so no command ever shows a traceback for bad input. So are the faults of the
machine that the user must fix (a full disk, a folder it may not write to): every command writes
atomically or resumes, so after the fix the same command finishes the work and loses nothing.
"""

import errno

import click

from captioner import __version__
from captioner.cli.corpus_commands import inspect
from captioner.cli.demo_commands import demo, synth
from captioner.cli.extract_commands import extract, features
from captioner.cli.inference_commands import caption_command, evaluate_command, score_command
from captioner.cli.runs_commands import runs_command
from captioner.cli.train_commands import train_command
from captioner.errors import CaptionerError

# OSErrors whose cause is outside the program: said in one line, never as a traceback.
_MACHINE_FAULTS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota exceeded)",
    errno.EACCES: "let this user read and write there",
    errno.EPERM: "let this user read and write there",
    errno.EROFS: "write to a writable disk",
}


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CaptionerError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:
            if error.errno not in _MACHINE_FAULTS:
                raise
            where = f"{error.filename}: " if error.filename else ""
            raise click.ClickException(
                f"{where}{error.strerror or error}; {_MACHINE_FAULTS[error.errno]}, then run the"
                " same command again (training: with --resume): it keeps the finished work and"
                " resumes"
            ) from None


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
