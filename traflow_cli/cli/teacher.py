"""`traflow teacher train|import`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from traflow_cli.cli import options as o
from traflow_cli.cli import render
from traflow_cli.specs import is_toy_data

app = typer.Typer(help="Train a rectified-flow teacher, or import an existing one.",
                  no_args_is_help=True)


@app.command("train")
def train_command(
    preset: o.Preset = "toy2d",
    sets: o.Sets = None,
    out: o.Out = None,
    device: o.Device = None,
    seed: o.Seed = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Training steps. (default: the spec's teacher.duration_steps)",
        show_default=False)] = None,
    as_json: o.Json = False,
    dry: o.DryRun = False,
) -> None:
    """Train v(x, t) by rectified flow on the preset's data (resumes an existing --out)."""
    spec = o.resolve(preset, sets, device=device, seed=seed,
                     values={"teacher.duration_steps": steps})
    if dry:
        o.dry_run(spec)
    from traflow_cli.jobs.teacher import train_teacher

    run_dir = out or Path("runs") / spec.preset / "teacher"
    with o.user_errors():
        result = train_teacher(spec, run_dir)
    o.emit(result, as_json, render.training_summary)


@app.command("reflow")
def reflow_command(
    teacher: Annotated[Path, typer.Option(
        "--teacher", "-t", help="The parent teacher run folder (a rectified flow).",
        show_default=False)],
    preset: Annotated[str | None, typer.Option(
        "--preset", "-p", help="Preset name or .toml file. (default: the parent run's own spec)",
        show_default=False)] = None,
    sets: o.Sets = None,
    out: o.Out = None,
    device: o.Device = None,
    seed: o.Seed = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Training steps. (default: the spec's reflow.duration_steps)",
        show_default=False)] = None,
    as_json: o.Json = False,
    dry: o.DryRun = False,
) -> None:
    """2-rectified flow: retrain a teacher on pairs (noise, its own ODE output), from its weights
    (resumes an existing --out). Its few-step Euler is straighter; distill it like any teacher."""
    values = {"reflow.parent": str(teacher), "reflow.duration_steps": steps}
    spec = o.resolve(preset, sets, device=device, seed=seed, values=values, teacher=teacher,
                     teacher_flag="reflow.parent")
    if dry:
        o.dry_run(spec)
    from traflow_cli.jobs.reflow import reflow

    run_dir = out or Path("runs") / spec.preset / "teacher-reflow"
    with o.user_errors():
        result = reflow(spec, run_dir)
    o.emit(result, as_json, render.training_summary)


FAMILIES = ("rectified-flow", "edm")


@app.command("import")
def import_command(
    source: Annotated[str, typer.Argument(
        help="Checkpoint family: 'rectified-flow' (the official Rectified Flow .pth files) or "
        "'edm' (NVlabs/edm network pickles, read without running any code in them).")],
    path: Annotated[Path, typer.Argument(help="The checkpoint file.", show_default=False)],
    out: o.Out = None,
    preset: Annotated[str | None, typer.Option(
        "--preset", "-p", help="Preset name or .toml file. (default: cifar10; for edm the preset "
        "the network fits: cifar10-edm, ffhq64 or imagenet64)", show_default=False)] = None,
    sets: o.Sets = None,
    image_size: Annotated[int | None, typer.Option(
        "--image-size", help="Image resolution of a rectified-flow checkpoint (its weights do "
        "not record it). (default: 32)", show_default=False)] = None,
    raw_weights: Annotated[bool, typer.Option(
        "--raw-weights", help="Take the trained weights instead of their EMA (rectified-flow "
        "only).")] = False,
    as_json: o.Json = False,
) -> None:
    """Import a foreign checkpoint as a traflow teacher run folder (checked name by name)."""
    if source not in FAMILIES:
        o.err(f"error: source: unknown checkpoint family {source!r}; supported: "
              f"{', '.join(FAMILIES)}")
        raise typer.Exit(o.EXIT_USAGE)
    for assignment in sets or []:
        if assignment.partition("=")[0].strip().split(".")[0] == "net":
            o.err(f"error: --set {assignment.partition('=')[0].strip()}: an imported teacher's "
                  "network is read from its file; drop this --set")
            raise typer.Exit(o.EXIT_USAGE)
    run_dir = out or Path("runs") / f"imported-{path.stem}"
    if source == "edm":
        if image_size is not None or raw_weights:
            flag = "--image-size" if image_size is not None else "--raw-weights"
            o.err(f"error: {flag}: not for edm snapshots, which record their resolution and "
                  "hold only the EMA network; drop it")
            raise typer.Exit(o.EXIT_USAGE)
        from traflow_cli.jobs.import_edm import import_edm_teacher

        with o.user_errors():
            result = import_edm_teacher(path, run_dir, preset=preset, sets=sets)
        o.emit(result, as_json, lambda r: render.key_values("imported teacher", r))
        return
    image_size = image_size or 32
    # Validated by the job once the file has said what the network is: the preset's own `net`
    # section is replaced by it, so it must not be checked against the data first.
    raw = o.raw_spec(preset or "cifar10", sets, values={"data.resolution": image_size})
    if is_toy_data(raw.get("data")):
        o.err(f"error: --preset: {raw.get('preset', preset)!r} is a toy (2-D) preset; an imported "
              "image teacher needs an image preset, e.g. --preset cifar10")
        raise typer.Exit(o.EXIT_USAGE)
    from traflow_cli.jobs.teacher import import_teacher

    with o.user_errors():
        result = import_teacher(raw, path, run_dir, image_size=image_size,
                                use_ema=not raw_weights)
    o.emit(result, as_json, lambda r: render.key_values("imported teacher", r))
