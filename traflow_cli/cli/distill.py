"""`traflow distill`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from traflow_cli.cli import options as o
from traflow_cli.cli import render


def distill_command(
    teacher: Annotated[Path | None, typer.Option(
        "--teacher", "-t", help="Teacher run folder (from 'traflow teacher train' or "
        "'traflow teacher import'). (default: the spec's distill.teacher)",
        show_default=False)] = None,
    preset: Annotated[str | None, typer.Option(
        "--preset", "-p", help="Preset name or .toml file. (default: the teacher run's own spec)",
        show_default=False)] = None,
    sets: o.Sets = None,
    out: o.Out = None,
    device: o.Device = None,
    seed: o.Seed = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Distillation steps. (default: the spec's distill.duration_steps)",
        show_default=False)] = None,
    method: Annotated[str | None, typer.Option(
        "--method", help="The objective: traflow, ctm, lagrangian or eulerian "
        "(docs/METHOD.md). (default: the spec's distill.method, traflow)",
        show_default=False)] = None,
    as_json: o.Json = False,
    dry: o.DryRun = False,
) -> None:
    """Distill a teacher into a 1-4 step student, by TraFlow or another objective (resumes an
    existing --out)."""
    values = {"distill.teacher": str(teacher) if teacher else None, "distill.duration_steps": steps,
              "distill.method": method}
    if teacher is None:  # the teacher may come from the preset or --set distill.teacher=...
        named = o.resolve(preset, sets, device=device, seed=seed, values=values).distill.teacher
        teacher = Path(named) if named else None
    if teacher is None:
        o.err("error: distill.teacher: required; pass --teacher RUN_DIR (a teacher run folder)")
        raise typer.Exit(o.EXIT_USAGE)
    # The teacher's network is part of the spec before it is validated or shown: what --dry-run
    # prints is what runs.
    spec = o.resolve(preset, sets, device=device, seed=seed, values=values, teacher=teacher)
    if dry:
        o.dry_run(spec)
    from traflow_cli.jobs.distill import distill

    run_dir = out or Path("runs") / spec.preset / "student"
    with o.user_errors():
        result = distill(spec, run_dir)
    o.emit(result, as_json, render.training_summary)
