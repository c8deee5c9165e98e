"""The one error type a user sees: a failure they can fix, said in one line.

Every part that reads user input (specs, data, checkpoints, foreign files, metrics, the runtime)
raises a subclass of `UserError` whose message names the field or file and the fix; the CLI
catches this one type, prints `error: <message>` on stderr and exits with code 2. Anything else
is a bug and keeps its traceback. No torch here, so specs and the CLI can use it for free.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a missing or corrupt file, an impossible request: one line, then exit 2.

    (A spec with several invalid fields is the one exception: one line per field.)
    """


def one_line(text: object) -> str:
    """Collapse whitespace, so a message quoting a foreign error (OSError, zlib) stays one line."""
    return " ".join(str(text).split())


class Interrupted(Exception):
    """A job stopped by Ctrl-C after saving what it had; the message says how to resume.

    The CLI prints it on one line and exits with code 130 (128 + SIGINT).
    """
