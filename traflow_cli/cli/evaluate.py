"""`traflow eval toy|agreement|fid`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from traflow_cli.cli import options as o
from traflow_cli.cli import render
from traflow_cli.runfolder import require_run

app = typer.Typer(help="Measure samples: toy distances, teacher agreement, FID.",
                  no_args_is_help=True)

TeacherRun = Annotated[Path | None, typer.Option(
    "--teacher", "-t", help="Teacher run folder.", show_default=False)]
StudentRun = Annotated[Path | None, typer.Option(
    "--student", help="Student run folder.", show_default=False)]


def _base_run(student: Path | None, teacher: Path | None
              ) -> tuple[Path, str, tuple[str, ...]] | None:
    """The run folder whose spec is the base when --preset is not given: the student's, else
    the teacher's (each must exist when given)."""
    if student is not None:
        return student, "--student", ("distill",)
    if teacher is not None:
        return teacher, "--teacher", ("teacher",)
    return None


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
    spec = o.resolve(preset, sets, device=device, seed=seed, run=_base_run(student, teacher),
                     values={"eval.num_samples": num_samples})
    if student is not None and teacher is not None:
        with o.user_errors():
            require_run(teacher, "--teacher", jobs=("teacher",))
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
    spec = o.resolve(None, sets, device=device, seed=seed, run=(student, "STUDENT", ("distill",)),
                     values={"eval.num_samples": num_samples})
    with o.user_errors():
        require_run(teacher, "--teacher", jobs=("teacher",))
    from traflow_cli.jobs.common import runtime_for
    from traflow_cli.jobs.evaluate import evaluate_agreement

    with o.user_errors():
        result = evaluate_agreement(spec, student_dir=student, teacher_dir=teacher,
                                    out=out or student, runtime=runtime_for(spec))
    o.emit(result, as_json, lambda r: render.table(
        f"agreement with the teacher's RK45 solve ({r['reference_nfe']} NFE); "
        f"straightness {r['straightness']:.4g}", r["rows"],
        ["model", "solver", "nfe", "mse", "psnr_db"]))


@app.command("fid")
def fid_command(
    samples: Annotated[Path, typer.Argument(
        help="Samples: a folder written by 'traflow sample' (or its samples.npz), or any "
        "folder, .zip or .npz (uint8 NHWC) of images.", show_default=False)],
    ref: Annotated[str | None, typer.Option(
        "--ref", "-r", help="Reference: a clean-fid dataset name (cifar10), a folder or .zip of "
        "images, or statistics .npz (mu, sigma). (default: the spec's eval.fid_reference)",
        show_default=False)] = None,
    mode: Annotated[str | None, typer.Option(
        "--mode", help="legacy_tensorflow (the CIFAR-10 protocol), clean or legacy_pytorch. "
        "(default: the spec's eval.fid_mode)", show_default=False)] = None,
    split: Annotated[str | None, typer.Option(
        "--split", help="Reference split: train or test. (default: the spec's eval.fid_split)",
        show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", min=1, help="Images per Inception forward pass. (default: 8 on CPU, "
        "where small batches run faster, 100 on a GPU)", show_default=False)] = None,
    offline: Annotated[bool, typer.Option(
        "--offline", help="Never download the network or reference statistics.")] = False,
    preset: Annotated[str | None, typer.Option(
        "--preset", "-p", help="Base spec. (default: the samples' own run spec)",
        show_default=False)] = None,
    sets: o.Sets = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for fid.json. (default: the SAMPLES folder)",
        show_default=False)] = None,
    device: o.Device = None,
    as_json: o.Json = False,
    dry: o.DryRun = False,
) -> None:
    """FID with clean-fid's protocol (default: legacy_tensorflow, training split; measure 50,000 samples)."""
    if not samples.exists():
        o.err(f"error: SAMPLES: no samples at '{samples}' (expected a folder written by "
              "'traflow sample', or a folder, .zip or .npz of images)")
        raise typer.Exit(o.EXIT_USAGE)
    own = samples if (samples / "spec.json").is_file() else samples.parent
    run = (own, "SAMPLES", None) if (own / "spec.json").is_file() else None
    spec = o.resolve(preset, sets, device=device, seed=None, run=run, values={
        "eval.fid_reference": ref, "eval.fid_mode": mode, "eval.fid_split": split})
    if dry:
        o.dry_run(spec)
    from traflow_cli.jobs.evaluate import evaluate_fid

    folder = out or (samples if samples.is_dir() else samples.parent)
    with o.user_errors():
        result = evaluate_fid(spec, samples=samples, out=folder, batch_size=batch_size,
                              allow_download=not offline)
    for line in result["warnings"]:
        o.err(line)
    o.emit(result, as_json, _render_fid)


def _render_fid(r: dict) -> None:
    from rich.table import Table

    ref, net = r["reference"], r["inception"]
    reference = f"{ref['source']} ({ref['kind']}, {ref['split']} split, {ref['resolution']}px"
    reference += f", {ref['num_images']:,} images)" if ref["num_images"] else ")"
    if ref["stats_path"] != ref["source"]:
        reference += f"\nstatistics: {ref['stats_path']}"
    out = Table(title=f"FID, written to {r['written']}" if r.get("written") else "FID")
    out.add_column("", justify="right", style="bold")
    out.add_column("", overflow="fold")
    for name, value in (
            ("FID", f"{r['fid']:.4f}"), ("samples", f"{r['num_samples']:,} ({r['samples']})"),
            ("mode", r["mode"]), ("reference", reference),
            ("inception", f"{net['source']}: {net['path']}\nsha256 {net['sha256']}")):
        out.add_row(name, value)
    render.console.print(out)
