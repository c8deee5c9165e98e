"""The one error type a user sees: a failure they can fix, said in one line.

Every part that reads user input (specs, data, checkpoints, foreign files, metrics, the runtime)
raises a subclass of `UserError` whose message names the field or file and the fix; the CLI
catches this one type, prints `error: <message>` on stderr and exits with code 2. Anything else
is a bug and keeps its traceback. No torch here, so specs and the CLI can use it for free.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Bad input, a missing or corrupt file, an impossible request: one line, then exit 2.

    (A spec with several invalid fields is the one exception: one line per field.)
    """


def one_line(text: object) -> str:
    """Collapse whitespace, so a message quoting a foreign error (OSError, zlib) stays one line."""
    return " ".join(str(text).split())


class WriteError(UserError):
    """A file we could not write for a reason the user fixes (a full disk, a read-only folder)."""


# errno -> (what happened, the fix); any other OSError while writing is a bug or a failing
# device and keeps its traceback.
_WRITE_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free space on {where}"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space on {where} or raise the quota"),
    errno.EFBIG: ("the file is too large for its file system", "write to another file system"),
    errno.EROFS: ("the file system is read-only", "make {where} writable or choose another folder"),
    errno.EACCES: ("permission denied", "make {where} writable or choose another folder"),
    errno.EPERM: ("operation not permitted", "make {where} writable or choose another folder"),
}


def write_error(err: OSError, path: os.PathLike[str] | str) -> WriteError | None:
    """The one-line error for an OSError raised while writing `path`, None if it is not one a
    user fixes (then it should keep its traceback)."""
    if err.errno not in _WRITE_ERRNOS:
        return None
    what, fix = _WRITE_ERRNOS[err.errno]
    where = os.path.dirname(os.path.abspath(path)) or "/"
    return WriteError(f"{path}: cannot write ({what}); {fix.format(where=where)}, then re-run "
                      "the same command")


@contextmanager
def writing(path: os.PathLike[str] | str) -> Iterator[None]:
    """Turn a full disk, a read-only folder or a quota met while writing `path` into one line."""
    try:
        yield
    except OSError as err:
        converted = write_error(err, path)
        if converted is None:
            raise
        raise converted from None


def write_fully(fd: int, payload: bytes | memoryview) -> None:
    """os.write until every byte is written: a short write is retried, and one that writes
    nothing (a full device that does not say so) is ENOSPC, never a silently short file."""
    view = memoryview(payload)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


class FIDError(UserError, ValueError):
    """A user-facing FID failure, carrying a single-line message meant to be shown as is.

    Raised by every metrics module (traflow_cli.metrics.fid re-exports it).
    """


class Interrupted(Exception):
    """A job stopped by Ctrl-C or SIGTERM after saving what it had; the message says how to
    resume.

    The CLI prints it on one line and exits with code 130 (128 + SIGINT) for either signal.
    """
