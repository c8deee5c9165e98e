"""`traflow eval toy|agreement|fid`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from traflow_cli.cli import options as o
from traflow_cli.cli import render

app = typer.Typer(help="Measure samples: toy distances, teacher agreement, FID.",
                  no_args_is_help=True)

TeacherRun = Annotated[Path | None, typer.Option(
    "--teacher", "-t", help="Teacher run folder.", show_default=False)]
StudentRun = Annotated[Path | None, typer.Option(
    "--student", help="Student run folder.", show_default=False)]


def _base(preset: str | None, *runs: Path | None) -> str:
    """The spec to start from: --preset, else the first run folder given, else toy2d."""
    if preset:
        return preset
    return next((str(r) for r in runs if r is not None), "toy2d")


@app.command("toy")
def toy_command(
    samples: Annotated[list[Path] | None, typer.Argument(
        help="samples.npz files written by 'traflow sample' (optional).", show_default=False)] = None,
    teacher: TeacherRun = None,
    student: StudentRun = None,
    num_samples: Annotated[int | None, typer.Option(
        "-n", "--num-samples", help="Points per measurement. (default: the spec's eval.num_samples)",
        show_default=False)] = None,
    preset: Annotated[str | None, typer.Option(
        "--preset", "-p", help="Base spec. (default: the student's, else the teacher's run spec)",
        show_default=False)] = None,
    sets: o.Sets = None,
    out: o.Out = None,
    device: o.Device = None,
    seed: o.Seed = None,
    as_json: o.Json = False,
    dry: o.DryRun = False,
) -> None:
    """Sliced Wasserstein distance and MMD to fresh true samples, with a picture (eval.png)."""
    spec = o.resolve(_base(preset, student, teacher), sets, device=device, seed=seed,
                     values={"eval.num_samples": num_samples})
    if dry:
        o.dry_run(spec)
    if not spec.data.is_toy:
        o.err(f"error: data.name: {spec.data.name!r} is an image dataset; use 'traflow eval fid' "
              "or 'traflow eval agreement'")
        raise typer.Exit(o.EXIT_USAGE)
    if teacher is None and student is None and not samples:
        o.err("error: nothing to measure; give --teacher, --student or samples.npz files")
        raise typer.Exit(o.EXIT_USAGE)
    from traflow_cli.jobs.common import runtime_for
    from traflow_cli.jobs.evaluate import evaluate_toy

    folder = out or (student or teacher or Path("runs") / spec.preset) / "eval"
    with o.user_errors():
        result = evaluate_toy(spec, teacher_dir=teacher, student_dir=student,
                              sample_files=list(samples or []), out=folder,
                              runtime=runtime_for(spec))
    o.emit(result, as_json, lambda r: (render.table(
        f"{r['distribution']}: distance to the true distribution", r["rows"],
        ["model", "solver", "nfe", "num_samples", "sliced_wasserstein", "mmd"]),
        render.console.print(f"picture: {r.get('picture')}")))


@app.command("agreement")
def agreement_command(
    student: Annotated[Path, typer.Argument(help="Student run folder.", show_default=False)],
    teacher: Annotated[Path, typer.Option(
        "--teacher", "-t", help="The teacher run it was distilled from.", show_default=False)],
    num_samples: Annotated[int | None, typer.Option(
        "-n", "--num-samples", help="Noise draws. [default: the spec's eval.num_samples, "
        "at most 256 images]", show_default=False)] = None,
    sets: o.Sets = None,
    out: o.Out = None,
    device: o.Device = None,
    seed: o.Seed = None,
    as_json: o.Json = False,
) -> None:
    """MSE/PSNR of the student (NFE 1, 2, 4) against the teacher's RK45 solve, same noise."""
    spec = o.resolve(str(student), sets, device=device, seed=seed,
                     values={"eval.num_samples": num_samples})
    from traflow_cli.jobs.common import runtime_for
    from traflow_cli.jobs.evaluate import evaluate_agreement

    with o.user_errors():
        result = evaluate_agreement(spec, student_dir=student, teacher_dir=teacher,
                                    out=out or student, runtime=runtime_for(spec))
    o.emit(result, as_json, lambda r: render.table(
        f"agreement with the teacher's RK45 solve ({r['reference_nfe']} NFE); "
        f"straightness {r['straightness']:.4g}", r["rows"],
        ["model", "solver", "nfe", "mse", "psnr_db"]))
