"""`traflow distill`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from traflow_cli.cli import options as o
from traflow_cli.cli import render
from traflow_cli.specs import check_teacher_run


def distill_command(
    teacher: Annotated[Path | None, typer.Option(
        "--teacher", "-t", help="Teacher run folder (from 'traflow teacher train' or "
        "'traflow teacher import'). (default: the spec's distill.teacher)",
        show_default=False)] = None,
    preset: o.Preset = "toy2d",
    sets: o.Sets = None,
    out: o.Out = None,
    device: o.Device = None,
    seed: o.Seed = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Distillation steps. (default: the spec's distill.duration_steps)",
        show_default=False)] = None,
    as_json: o.Json = False,
    dry: o.DryRun = False,
) -> None:
    """Distill a teacher into a 1-4 step student with TraFlow (resumes an existing --out)."""
    spec = o.resolve(preset, sets, device=device, seed=seed,
                     values={"distill.teacher": str(teacher) if teacher else None,
                             "distill.duration_steps": steps})
    if dry:  # prints the resolved spec; the teacher folder is needed only to run
        o.dry_run(spec)
    with o.user_errors():
        check_teacher_run(spec.distill.teacher)
    from traflow_cli.jobs.distill import distill

    run_dir = out or Path("runs") / spec.preset / "student"
    with o.user_errors():
        result = distill(spec, run_dir)
    o.emit(result, as_json, render.training_summary)
