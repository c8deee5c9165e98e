"""`traflow bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from traflow_cli.cli import options as o
from traflow_cli.cli import render


def bench_command(
    teacher: Annotated[Path | None, typer.Option(
        "--teacher", "-t", help="Teacher run folder. (default: the preset's network, fresh "
        "weights)", show_default=False)] = None,
    student: Annotated[Path | None, typer.Option(
        "--student", help="Student run folder. (default: built from the teacher)",
        show_default=False)] = None,
    preset: o.Preset = "toy2d",
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Batch size. (default: the spec's bench.batch_size)",
        show_default=False)] = None,
    sets: o.Sets = None,
    device: o.Device = None,
    seed: o.Seed = None,
    as_json: o.Json = False,
    dry: o.DryRun = False,
) -> None:
    """Images/s, latency and TFLOP/s: student vs teacher sampling, and training steps."""
    spec = o.resolve(preset, sets, device=device, seed=seed,
                     values={"bench.batch_size": batch_size})
    if dry:
        o.dry_run(spec)
    from traflow_cli.jobs.bench import bench
    from traflow_cli.jobs.common import runtime_for

    with o.user_errors():
        result = bench(spec, teacher_dir=teacher, student_dir=student, runtime=runtime_for(spec))
    o.emit(result, as_json, lambda r: render.table(
        f"{r['device']}: matmul peak {r['matmul_peak_tflops']:.3g} TFLOP/s ({r['precision']})",
        r["rows"], ["model", "task", "solver", "nfe", "batch", "images_per_s", "latency_ms",
                    "gflop_per_image", "tflops", "peak_fraction"]))
