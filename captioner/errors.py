"""The one exception type that reaches users as a single line instead of a traceback."""


class CaptionerError(Exception):
    """Bad input or an impossible request: the message names the file and what is wrong.

    The CLI prints it as ``error: <message>`` and exits with status 1. Library code raises it
    wherever a user (not a programmer) can cause the failure.
    """
