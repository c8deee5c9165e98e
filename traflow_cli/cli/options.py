"""Options every subcommand shares, and the one place errors become exit codes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from traflow_cli.errors import Interrupted, UserError
from traflow_cli.presets import (
    DEFAULT_PRESET,
    available_presets,
    load_preset,
    load_run_spec,
    merge_sources,
    resolve_spec,
    resolve_with_teacher,
)
from traflow_cli.specs import RunSpec, build_spec

Preset = Annotated[str, typer.Option(
    "--preset", "-p", help=f"Preset name ({', '.join(available_presets())}) or a .toml file.")]
Sets = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override one spec field, section.key=value (repeatable), "
    "e.g. --set distill.lr=2e-4.", show_default=False)]
Out = Annotated[Path | None, typer.Option(
    "--out", "-o", help="Run folder to write (re-run the same command on it to resume).",
    show_default=False)]
Device = Annotated[str | None, typer.Option(
    "--device", help="cpu, cuda or auto. (default: the spec's runtime.device)",
    show_default=False)]
Seed = Annotated[int | None, typer.Option(
    "--seed", help="Random seed. (default: the spec's seed)", show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", help="Print the resolved spec as JSON and exit without doing any work.")]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def err(message: str) -> None:
    typer.echo(message, err=True)


class _WarningLines(logging.Handler):
    """The engine's and jobs' warnings (logger "traflow") as `warning: ...` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err(f"warning: {record.getMessage()}")


def show_warnings() -> None:
    """Route warnings to stderr once per process (idempotent: the app callback calls it)."""
    log = logging.getLogger("traflow")
    if not any(isinstance(h, _WarningLines) for h in log.handlers):
        log.addHandler(_WarningLines(level=logging.WARNING))
        log.propagate = False


def resolve(preset: str | None, sets: list[str] | None, *, device: str | None, seed: int | None,
            values: dict[str, Any] | None = None, teacher: Path | None = None,
            teacher_flag: str = "distill.teacher",
            run: tuple[Path, str, tuple[str, ...] | None] | None = None) -> RunSpec:
    """The run spec from its sources, or a one-line error exit.

    Sources, later ones winning: the base (--preset; else the `run` folder's own spec, given as
    (folder, how the user passed it, the jobs it may hold), which must exist; else toy2d), the
    typed flags, then --set. With `teacher` the network is the teacher run's (see
    presets.resolve_with_teacher).
    """
    merged = {"runtime.device": device, "seed": seed, **(values or {})}
    with user_errors():
        if teacher is not None:
            return resolve_with_teacher(preset, sets, merged, teacher=str(teacher),
                                        flag=teacher_flag)
        if run is not None:
            folder, flag, jobs = run
            base = load_run_spec(folder, flag, jobs=jobs)  # the folder must exist either way
            raw = load_preset(preset) if preset else base
            return build_spec(merge_sources(raw, sets, merged))
        return resolve_spec(preset or DEFAULT_PRESET, sets, merged)


def raw_spec(preset: str, sets: list[str] | None, *, values: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The merged but not yet validated spec dict, for a job that completes it (an import)."""
    with user_errors():
        return merge_sources(load_preset(preset), sets, values)


def dry_run(spec: RunSpec) -> None:
    typer.echo(spec.model_dump_json(indent=2))
    raise typer.Exit(0)


def emit(result: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], None]) -> None:
    """JSON on stdout for scripts, or a human rendering."""
    if as_json:
        typer.echo(json.dumps(result, default=str))
    else:
        render(result)


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input ends with `error: ...` lines on stderr and exit code 2, never a traceback."""
    try:
        yield
    except UserError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            err(f"error: {line}")
        raise typer.Exit(EXIT_USAGE) from None
    except Interrupted as exc:
        err(str(exc))
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        err("interrupted; re-run the same command to continue")
        raise typer.Exit(EXIT_INTERRUPTED) from None
