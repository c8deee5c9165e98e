"""Options every subcommand shares, and the one place errors become exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from traflow_cli.errors import UserError
from traflow_cli.presets import resolve_spec
from traflow_cli.specs import RunSpec

Preset = Annotated[str, typer.Option(
    "--preset", "-p", help="Preset name (toy2d, shapes32, cifar10, celeba64, ffhq64, "
    "imagenet64) or a .toml file.")]
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


def resolve(preset: str, sets: list[str] | None, *, device: str | None, seed: int | None,
            values: dict[str, Any] | None = None) -> RunSpec:
    """The run spec from the preset, the typed flags and --set, or a one-line error exit."""
    merged = {"runtime.device": device, "seed": seed, **(values or {})}
    with user_errors():
        return resolve_spec(preset, sets, merged)


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
    except Exception as exc:
        if "torch" not in sys.modules:
            raise
        from traflow_cli.engine.loop import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            err(f"interrupted at step {exc.step}; checkpoint saved to {exc.checkpoint}. "
                "Re-run the same command to resume.")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        raise
