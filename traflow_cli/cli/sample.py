"""`traflow sample`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from traflow_cli.cli import options as o
from traflow_cli.cli import render
from traflow_cli.specs import RunSpec

RUN_JOBS = ("teacher", "distill")  # what a model to sample from is written by


def _times(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        o.err(f"error: --times: {text!r} is not a comma-separated list of numbers, e.g. 0,0.6,1")
        raise typer.Exit(o.EXIT_USAGE) from None


def sample_command(
    run: Annotated[Path, typer.Argument(help="Teacher or student run folder.", show_default=False)],
    nfe: Annotated[int | None, typer.Option(
        "--nfe", help="Student: network evaluations (jumps). (default: the spec's sample.nfe)",
        show_default=False)] = None,
    num_samples: Annotated[int | None, typer.Option(
        "-n", "--num-samples", help="How many samples. (default: the spec's sample.num_samples)",
        show_default=False)] = None,
    times: Annotated[str | None, typer.Option(
        "--times", help="Student: explicit times 0,...,1 (nfe + 1 values; --nfe defaults to "
        "their count less one). (default: the student's grid)",
        show_default=False)] = None,
    solver: Annotated[str | None, typer.Option(
        "--solver", help="Teacher: euler, heun or rk45. (default: the spec's sample.solver)",
        show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Teacher: fixed solver steps. (default: the spec's sample.steps)",
        show_default=False)] = None,
    time_grid: Annotated[str | None, typer.Option(
        "--time-grid", help="uniform or karras: the teacher's solver grid, or where a student's "
        "jumps land. (default: the run's own, e.g. Karras for EDM teachers)",
        show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Samples per batch. (default: the spec's sample.batch_size)",
        show_default=False)] = None,
    label: Annotated[int | None, typer.Option(
        "--class-label", "--class",
        help="Class label for conditional models. (default: cycle through classes)",
        show_default=False)] = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", help="Images: png, npz or both. (default: the spec's sample.format)",
        show_default=False)] = None,
    preset: Annotated[str | None, typer.Option(
        "--preset", "-p", help="Base spec. (default: the run folder's own spec)",
        show_default=False)] = None,
    sets: o.Sets = None,
    out: o.Out = None,
    device: o.Device = None,
    seed: o.Seed = None,
    as_json: o.Json = False,
    dry: o.DryRun = False,
) -> None:
    """Write samples of a teacher (ODE solve) or a student (few jumps); resumes a partial --out."""
    jump_times = _times(times)
    if nfe is None and jump_times is not None:
        nfe = len(jump_times) - 1  # --times 0,0.6,1 means two jumps
    spec = o.resolve(preset, sets, device=device, seed=seed, run=(run, "RUN", RUN_JOBS), values={
        "sample.nfe": nfe, "sample.num_samples": num_samples, "sample.times": jump_times,
        "sample.solver": solver, "sample.steps": steps, "sample.batch_size": batch_size,
        "sample.time_grid": time_grid,
        "sample.class_label": label, "sample.format": fmt})
    if dry:
        o.dry_run(spec)
    from traflow_cli.jobs.common import runtime_for
    from traflow_cli.jobs.sample import sample_run

    with o.user_errors():
        runtime = runtime_for(spec)
        folder = out or run / _default_name(run, spec)
        result = sample_run(spec, run, folder, runtime)
    result["out"] = str(folder)
    o.emit(result, as_json, lambda r: render.key_values("samples", r))


def _default_name(run: Path, spec: RunSpec) -> str:
    from traflow_cli.engine.checkpoint import run_checkpoint

    if run_checkpoint(run).metadata.get("role") == "student":
        return f"samples-nfe{spec.sample.nfe}"
    suffix = "" if spec.sample.solver == "rk45" else str(spec.sample.steps)
    return f"samples-{spec.sample.solver}{suffix}"
