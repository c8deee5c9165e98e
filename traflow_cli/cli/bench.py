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
    preset: Annotated[str | None, typer.Option(
        "--preset", "-p", help="Preset name or .toml file. (default: the teacher's or student's "
        "run spec, else toy2d)", show_default=False)] = None,
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
    run = (student, "--student", ("distill",)) if student is not None else None
    spec = o.resolve(preset, sets, device=device, seed=seed, teacher=teacher, run=run,
                     teacher_flag="--teacher",
                     values={"bench.batch_size": batch_size})
    if dry:
        o.dry_run(spec)
    from traflow_cli.jobs.bench import bench
    from traflow_cli.jobs.common import runtime_for

    with o.user_errors():
        result = bench(spec, teacher_dir=teacher, student_dir=student, runtime=runtime_for(spec))
    o.emit(result, as_json, _render)


# JSON field -> table heading; short, so that the table fits an 80-column terminal.
COLUMNS = {"model": "model", "task": "task", "solver": "solver", "nfe": "NFE",
           "images_per_s": "img/s", "latency_ms": "ms/batch", "gflop_per_image": "GFLOP/img",
           "tflops": "TFLOP/s", "peak_fraction": "of peak"}


SHORT_NAMES = {"rectified flow": "RF"}
# The distillation rows differ by where the teacher's trajectories come from.
TEACHER_SOLVE = {"cached": "TF cache", "per step": "TF solve"}
SOLVE_WORDS = {"cached": "teacher cached", "per step": "teacher solved each step"}


def _render(result: dict) -> None:
    from rich import box
    from rich.table import Table

    runtime = result.get("runtime", {})
    options = [name for name in ("compile", "channels_last", "cuda_graphs", "tf32")
               if runtime.get(name)]
    batch = result["rows"][0]["batch"] if result["rows"] else "-"
    table = Table(title=f"{result['device']}, batch {batch}, {result['precision']}"
                  f"{''.join(', ' + o for o in options)}; matmul peak "
                  f"{result['matmul_peak_tflops']:.3g} TFLOP/s", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True, show_edge=False)
    for key, heading in COLUMNS.items():
        table.add_column(heading, justify="left" if key in ("model", "task", "solver") else "right",
                         no_wrap=True)
    for row in result["rows"]:
        cells = {key: _short(key, row.get(key)) for key in COLUMNS}
        if row.get("teacher_solve") in TEACHER_SOLVE:
            cells["solver"] = TEACHER_SOLVE[row["teacher_solve"]]
        table.add_row(*cells.values())
    render.console.print(table)
    steps = [r for r in result["rows"] if "of_teacher_step" in r]
    for row in steps:
        render.console.print(f"TraFlow step ({SOLVE_WORDS.get(row.get('teacher_solve'), '')}): "
                             f"{100 * row['of_teacher_step']:.0f}% of the teacher step's img/s")


def _short(name: str, value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, float):
        return SHORT_NAMES.get(str(value), str(value))
    if name == "peak_fraction":
        return f"{100 * value:.0f}%"
    if name == "nfe":
        return f"{value:.3g}"
    if value >= 1000:
        return f"{value:.0f}"
    return f"{value:.3g}" if value >= 0.01 else f"{value:.1e}"
