"""Run-folder records: spec.json, metrics.jsonl, summary.json, written so a crash loses nothing."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from traflow_cli.errors import write_fully, writing
from traflow_cli.version import __version__


@contextlib.contextmanager
def replaced_on_success(path: Path, *, durable: bool = True, tmp_suffix: str | None = None,
                        make_folder: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; a clean exit renames it over `path`
    (readers see the old file or the whole new one), any error removes it and re-raises.

    A full disk or a read-only folder is a one-line WriteError naming `path`. `durable`: fsync
    the folder after the rename (the writer fsyncs the file itself). `tmp_suffix` names the
    temporary (default `.tmp-PID`); `make_folder=False` reports a folder deleted under a running
    job instead of re-making it.
    """
    tmp = path.with_name(f".{path.name}{tmp_suffix or f'.tmp-{os.getpid()}'}")
    with writing(path):
        if make_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        if durable:
            fsync_dir(path.parent)


def atomic_write_bytes(path: Path, payload: bytes, *, durable: bool = True,
                       tmp_suffix: str | None = None, make_folder: bool = True) -> None:
    """Write `payload` to `path` through `replaced_on_success`: the old file (a previous
    checkpoint, spec.json) stays as it was on any failure and no temporary is left behind.

    `durable`: fsync the file and the folder (a checkpoint, a record); without it a crash can
    lose the write but never leave a cut file under its name (the many files of a sample folder,
    which a resume checks instead).
    """
    with replaced_on_success(path, durable=durable, tmp_suffix=tmp_suffix,
                             make_folder=make_folder) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_fully(fd, payload)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def versions() -> dict[str, str]:
    """The versions a run record names: traflow, torch, Python and the platform."""
    return {"traflow": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": sys.platform}


def write_spec_record(run_dir: Path, *, job: str, spec: dict[str, Any], fingerprint: str,
                      command: list[str] | None = None) -> None:
    """spec.json: the resolved spec, its fingerprint, the versions and the command line."""
    atomic_write_json(run_dir / "spec.json", {
        "job": job,
        "spec": spec,
        "fingerprint": fingerprint,
        "versions": versions(),
        "command": command if command is not None else sys.argv,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only the metrics rows of steps up to `step` (a resume from there writes the rest
    again), dropping any half-written last line."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    atomic_write_bytes(path, "".join(kept).encode())


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """One JSON object per log tick; a line is flushed whole so readers never see half of one."""
    path = run_dir / "metrics.jsonl"
    with writing(path), open(path, "a") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(run_dir / "summary.json", summary)
