"""`traflow bench`: the JSON report's schema, its internal consistency, and the CPU speed bar
(the student's 1-NFE sampling at least 10x the images/s of the teacher's 100-step Euler)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import invoke
from torch import nn

from traflow_cli.engine.runtime import CudaGraphed, RuntimeSetupError, setup_runtime
from traflow_cli.jobs.bench import count_evaluations, count_flops

SMALL = ["--device", "cpu", "--json", "--set", "bench.repeats=2", "--set", "bench.warmup=1",
         "--set", "bench.student_nfe=[1,2,4]", "--set", "bench.teacher_steps=[1,100]"]
ROW_KEYS = {"model", "task", "nfe", "batch", "images_per_s", "tflops", "latency_ms",
            "gflop_per_image", "peak_fraction"}


def run_bench(*args: str) -> dict:
    result = invoke("bench", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def row(report: dict, model: str, task: str, nfe: float | None = None,
        solver: str | None = None) -> dict:
    found = [r for r in report["rows"] if r["model"] == model and r["task"] == task
             and (nfe is None or r["nfe"] == nfe) and (solver is None or r.get("solver") == solver)]
    assert len(found) == 1, (model, task, nfe, solver, report["rows"])
    return found[0]


def check_report(report: dict, batch: int, student_nfe: list[int], teacher_steps: list[int],
                 rk45: bool = True, grid_steps: int = 18, vel_every: int = 1,
                 derivative: str = "jvp") -> None:
    """Schema, every row present, and numbers that agree with each other."""
    assert isinstance(report["device"], str) and report["device"].startswith("cpu")
    assert report["matmul_peak_tflops"] > 0
    assert report["precision"] == "float32"  # CPU runs stay float32 ...
    assert report["runtime"]["cuda_graphs"] is False  # ... and never capture graphs
    for r in report["rows"]:
        assert ROW_KEYS <= r.keys()
        assert r["model"] in ("teacher", "student") and r["task"] in ("sample", "train")
        assert r["batch"] == batch
        assert r["images_per_s"] > 0 and r["tflops"] > 0 and r["gflop_per_image"] > 0
        assert r["latency_ms"] * r["images_per_s"] / 1e3 == pytest.approx(batch)
        assert r["tflops"] == pytest.approx(r["gflop_per_image"] * r["images_per_s"] / 1e3)
        assert r["peak_fraction"] == pytest.approx(r["tflops"] / report["matmul_peak_tflops"])
    one_student = row(report, "student", "sample", 1)
    for nfe in student_nfe:  # flops per image scale with the number of jumps
        assert row(report, "student", "sample", nfe)["gflop_per_image"] == pytest.approx(
            nfe * one_student["gflop_per_image"])
    euler = {n: row(report, "teacher", "sample", n, "euler") for n in teacher_steps}
    for n in teacher_steps:
        assert euler[n]["gflop_per_image"] == pytest.approx(
            n / teacher_steps[0] * euler[teacher_steps[0]]["gflop_per_image"])
    if rk45:
        assert row(report, "teacher", "sample", solver="rk45")["nfe"] >= 7
    teacher_step = row(report, "teacher", "train")
    assert teacher_step["nfe"] == 1 and math.isfinite(teacher_step["loss"])
    distills = [r for r in report["rows"] if r["model"] == "student" and r["task"] == "train"]
    assert sorted(r["teacher_solve"] for r in distills) == ["cached", "per step"]
    for distill in distills:
        evals = distill["evaluations"]
        # G and dG/ds (on every vel_every-th row: one forward-mode pass, or two jumps for a
        # central difference) on the student; G^- on at most four batches (identity jumps are
        # free); the teacher's Heun solve on the grid unless it is cached.
        assert (distill["derivative"], distill["vel_every"]) == (derivative, vel_every)
        per_row = 2 if derivative == "fd" else 1
        assert evals["student"] == 1 + per_row * math.ceil(batch / vel_every) / batch
        assert 0 < evals["target"] <= 4
        assert evals["teacher"] == (0 if distill["teacher_solve"] == "cached" else 2 * grid_steps)
        assert distill["gflop_per_image"] > teacher_step["gflop_per_image"]
        assert math.isfinite(distill["loss"])
        assert distill["of_teacher_step"] == pytest.approx(
            distill["images_per_s"] / teacher_step["images_per_s"])
    # The work each row reports is what its NFE says (speed ratios themselves belong to
    # benchmarks/ and a quiet machine, not to a test that a busy machine would fail).
    per_eval = euler[teacher_steps[0]]["gflop_per_image"] / teacher_steps[0]
    assert per_eval <= one_student["gflop_per_image"] < 1.5 * per_eval  # + the s branch only


def test_bench_toy2d_reports_every_row_consistently() -> None:
    report = run_bench("--preset", "toy2d", "--batch-size", "256", *SMALL)
    check_report(report, batch=256, student_nfe=[1, 2, 4], teacher_steps=[1, 100])
    assert report["compiled"] is False
    from traflow_cli.cli.bench import _render

    _render(report)  # the human table renders the same report


@pytest.mark.slow
def test_bench_shapes32_image_networks() -> None:
    report = run_bench("--preset", "shapes32", "--batch-size", "4", "--device", "cpu", "--json",
                       "--set", "bench.repeats=1", "--set", "bench.student_nfe=[1,2]",
                       "--set", "bench.teacher_steps=[1,100]")
    check_report(report, batch=4, student_nfe=[1, 2], teacher_steps=[1, 100], grid_steps=8,
                 derivative="fd")  # the preset's "auto", on a CPU
    # A DDPM++ forward at 32x32 with nf=16 is a few hundred MFLOP, convolutions included.
    assert 0.05 < row(report, "teacher", "sample", 1)["gflop_per_image"] < 1.0


@pytest.mark.slow
def test_bench_with_torch_compile_on_cpu() -> None:
    report = run_bench("--preset", "toy2d", "--batch-size", "64", "--device", "cpu", "--json",
                       "--set", "runtime.compile=on", "--set", "bench.repeats=1",
                       "--set", "bench.student_nfe=[1]", "--set", "bench.teacher_steps=[100]",
                       "--set", "bench.rk45=false")
    assert report["compiled"] is True and report["runtime"]["compile"] is True
    check_report(report, batch=64, student_nfe=[1], teacher_steps=[100], rk45=False)


def test_cpu_runtime_defaults_to_float32_eager() -> None:
    runtime = setup_runtime(device="cpu")
    assert runtime.amp_dtype is None and not runtime.compile and not runtime.cuda_graphs
    assert not runtime.channels_last and not runtime.tf32
    fn = lambda x: x + 1  # noqa: E731
    assert runtime.maybe_compile(fn) is fn and runtime.fixed_shape(fn) is fn
    # Asked for explicitly, CUDA graphs are still off without CUDA; compile is honoured.
    forced = setup_runtime(device="cpu", compile="on", cuda_graphs="on", channels_last="on")
    assert forced.compile and not forced.cuda_graphs and forced.fixed_shape(fn) is fn
    assert forced.channels_last
    assert forced.place_batch(torch.zeros(2, 3, 4, 4)).is_contiguous(
        memory_format=torch.channels_last)
    with pytest.raises(RuntimeSetupError, match="bf16"):
        setup_runtime(device="cpu", precision="bf16")
    assert isinstance(CudaGraphed(fn), CudaGraphed)


def test_flop_and_evaluation_counters() -> None:
    net = nn.Linear(8, 16)
    x = torch.randn(5, 8)
    assert count_flops(lambda: net(x)) == 2 * 5 * 8 * 16
    with count_evaluations({"net": net}, batch=5) as evals:
        net(x)
        net(torch.cat([x, x]))
    assert evals == {"net": 3.0}


def test_bench_times_the_jobs_own_step_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change to the distill job's step shows in the bench, and the bench numbers its steps
    as the job does (so the learning-rate warm-up is the job's, not a fixed step 0)."""
    from traflow_cli.jobs import distill, teacher

    (config_class, real_loss), real_step = distill.OBJECTIVES["traflow"], teacher.optimizer_step
    teacher_steps: list[int] = []

    def loss_plus_seven(batch, config):
        loss = real_loss(batch, config)
        loss.total = loss.total + 7.0
        return loss

    def recording_step(optimizer, params, step, training):
        teacher_steps.append(step)
        return real_step(optimizer, params, step, training)

    monkeypatch.setitem(distill.OBJECTIVES, "traflow", (config_class, loss_plus_seven))
    monkeypatch.setattr(teacher, "optimizer_step", recording_step)
    report = run_bench("--preset", "toy2d", "--batch-size", "64", *SMALL,
                       "--set", "bench.rk45=false")
    for r in report["rows"]:
        if r["task"] == "train":
            assert (r["loss"] > 7) == (r["model"] == "student"), r
    # One counted step (0), then warm-up and timed steps numbered on from it.
    assert teacher_steps == [0, 1, 2, 3]
