"""Run folders without torch: read their record, tell their kind, lock them, sweep leftovers.

A run folder is what a job writes (`spec.json`, `metrics.jsonl`, `summary.json`, `checkpoints/`).
Everything here is stdlib only, so the CLI can check a folder before torch is imported, and a
corrupt record is one line naming the file rather than a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from traflow_cli.errors import UserError, one_line
from traflow_cli.untrusted import read_json_file

RECORD = "spec.json"
LOCK = ".lock"
MAX_RECORD_BYTES = 16 << 20  # a spec.json is a few KB


class RunFolderError(UserError):
    """A run folder that is missing, of the wrong kind, corrupt or busy."""


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The folder's spec.json as a dict, None if it has none; corrupt records are one line."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        # Bounded in size and depth: a record of a few KB never needs more, and a nested or huge
        # one would otherwise end in a RecursionError or exhaust memory.
        record = read_json_file(path, max_bytes=MAX_RECORD_BYTES)
    except (UnicodeDecodeError, ValueError) as err:
        raise RunFolderError(f"{path}: not a readable run record ({one_line(err)}); restore it, or "
                             "delete the folder and start the run again") from None
    except OSError as err:
        raise RunFolderError(f"{path}: cannot read ({one_line(err.strerror or err)})") from None
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict) or not isinstance(
            record.get("job"), str):
        raise RunFolderError(f"{path}: not a traflow run record (expected 'job' and 'spec'); "
                             "restore it, or delete the folder and start the run again")
    return record


def require_run(run_dir: Path, flag: str, *, jobs: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The record of an existing run folder passed as `flag`, or a one-line error saying what
    is there instead (nothing, a folder that is not a run, a run of another job)."""
    run_dir = Path(run_dir)
    wanted = " or ".join(jobs) if jobs else "traflow"
    if not run_dir.exists():
        raise RunFolderError(f"{flag}: no run folder at '{run_dir}' (expected a folder written by "
                             f"'traflow {wanted}')")
    record = read_record(run_dir)
    if record is None:
        raise RunFolderError(f"{flag}: '{run_dir}' is not a run folder (it has no {RECORD}); pass "
                             f"a folder written by 'traflow {wanted}'")
    if jobs is not None and record["job"] not in jobs:
        raise RunFolderError(f"{flag}: '{run_dir}' holds a {record['job']!r} run, not {wanted}")
    return record


def check_output_folder(out: Path, job: str, flag: str = "--out") -> dict[str, Any] | None:
    """Refuse to write `job`'s outputs into a folder that belongs to something else.

    Returns the folder's record when it already holds a run of this job (to be resumed), None
    when the folder is new or empty.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{flag}: '{out}' is a file, not a folder; choose another {flag}")
    record = read_record(out)
    if record is not None:
        if record["job"] != job:
            raise RunFolderError(f"{flag}: '{out}' holds a {record['job']!r} run; writing "
                                 f"{job!r} outputs there would overwrite it; choose another {flag}")
        return record
    if out.is_dir():
        # A job writes its record before anything else it keeps, so a folder without one may
        # hold only what a failed start leaves: the lock and half-written temporaries.
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name != LOCK and not is_temporary(p.name))
        if foreign:
            raise RunFolderError(f"{flag}: '{out}' already holds files that are not a traflow run "
                                 f"({', '.join(foreign[:3])}); choose a new or empty folder")
    return None


def is_temporary(name: str) -> bool:
    """Names our atomic writers use while a file is being written (`.NAME.tmp-PID`, `.NAME.tmp`)."""
    return name.startswith(".") and (".tmp-" in name or name.endswith(".tmp"))


def remove_stale_temporaries(*folders: Path) -> int:
    """Delete half-written files that killed writers left behind; call it holding the lock."""
    removed = 0
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for path in Path(folder).iterdir():
            if path.is_file() and is_temporary(path.name):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


class RunLock:
    """An exclusive lock on a run folder for the life of a job (advisory, `flock` on `.lock`).

    The kernel drops the lock when the process dies, so a killed job never leaves its folder
    locked. A second job on the same folder is refused with one line naming the holder's pid.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): run unlocked rather than not at all
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunFolderError(f"{self.path.parent}: in use by another traflow process (pid "
                                 f"{holder}); wait for it to finish or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
