"""Image teachers and students end to end on shapes32, on the CPU, through the CLI.

The slow test is a shortened run of the shapes32 preset (same network family and recipe, fewer
and smaller steps); its 1-NFE student must already agree with the teacher's accurate RK45 solve
better than the teacher's own 1-step Euler does, from the same noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_FIXTURES, invoke

from traflow_cli import Student, load_student, load_teacher
from traflow_cli.nets import student_from_teacher
from traflow_cli.sampling import sample_teacher

OFFICIAL_32 = OFFICIAL_FIXTURES["official-nf16"][0]  # an official-format 32x32 checkpoint

# The shapes32 preset, shrunk to about a minute of CPU: a 10x shorter teacher, half the
# trajectory cache, 40% of the distillation steps, 16 noise draws for the agreement.
SHORT_TEACHER = ["--steps", "200", "--device", "cpu", "--set", "teacher.log_every_steps=50",
                 "--set", "teacher.checkpoint_every_steps=100"]
SHORT_DISTILL = ["--steps", "60", "--device", "cpu", "--set", "distill.trajectory_cache=128",
                 "--set", "distill.log_every_steps=10", "--set", "distill.checkpoint_every_steps=20"]
AGREEMENT = ["-n", "16", "--device", "cpu", "--json"]


@pytest.mark.slow
def test_shapes32_student_beats_the_teachers_one_step_euler(tmp_path: Path) -> None:
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    result = invoke("teacher", "train", "--preset", "shapes32", "--out", teacher, *SHORT_TEACHER)
    assert result.exit_code == 0, result.output
    result = invoke("distill", "--preset", "shapes32", "--teacher", teacher, "--out", student,
                    "--json", *SHORT_DISTILL)
    assert result.exit_code == 0, result.output
    final = json.loads(result.stdout)["final_metrics"]
    assert all(final[k] == final[k] for k in ("loss_out", "loss_vel", "loss_sc"))  # not NaN
    assert (student / "teacher_trajectories.safetensors").is_file()

    result = invoke("sample", student, "--nfe", "1", "-n", "10", "--batch-size", "4",
                    "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    made = json.loads(result.stdout)
    out = Path(made["out"])
    assert made["num_samples"] == 10 and made["nfe"] == 1
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [
        f"{i:06d}.png" for i in range(10)]
    assert (out / "grid.png").is_file()

    result = invoke("eval", "agreement", student, "--teacher", teacher, *AGREEMENT)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    mse = {(r["model"], r["nfe"]): r["mse"] for r in report["rows"]}
    assert report["num_samples"] == 16 and report["reference"] == "teacher rk45"
    # The teacher must have learned something (a flow that moves), else the bar is empty.
    assert mse[("teacher", 1)] > 2 * mse[("teacher", 4)], mse
    assert mse[("student", 1)] < 0.8 * mse[("teacher", 1)], mse
    assert (student / "agreement.json").is_file()


def test_student_at_step_zero_jumps_as_the_teachers_euler_step(tmp_path: Path) -> None:
    # A teacher with non-trivial weights: the official-format fixture, imported by the CLI.
    run = tmp_path / "teacher"
    result = invoke("teacher", "import", "rectified-flow", OFFICIAL_32,
                    "--out", run)
    assert result.exit_code == 0, result.output
    teacher = load_teacher(run)
    student = Student(student_from_teacher(teacher.net, teacher.config), teacher.config).eval()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9])
    s = torch.tensor([1.0, 0.4, 0.75, 0.95])
    with torch.no_grad():
        euler = x + (s - t).view(-1, 1, 1, 1) * teacher.velocity(x, t)
        jumped = student.jump(x, t, s)
        assert torch.allclose(jumped, euler, rtol=0, atol=1e-6)
        assert torch.equal(student.jump(x, t, t), x)  # G(x, t, t) = x
        one_step, nfe = sample_teacher(teacher.velocity, x, solver="euler", steps=1)
    assert nfe == 1
    assert torch.allclose(student.sample(x, nfe=1), one_step, rtol=0, atol=1e-6)
    assert (euler - x).abs().mean() > 1e-2  # the velocity is not trivially zero


def test_load_student_reads_a_distilled_image_run(tmp_path: Path) -> None:
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert invoke("teacher", "import", "rectified-flow", OFFICIAL_32,
                  "--out", teacher, "--preset", "shapes32").exit_code == 0
    result = invoke("distill", "--preset", "shapes32", "--teacher", teacher, "--out", student,
                    "--steps", "1", "--device", "cpu", "--set", "distill.batch_size=2",
                    "--set", "distill.grid_steps=2", "--set", "distill.trajectory_cache=0")
    assert result.exit_code == 0, result.output
    loaded = load_student(student)
    assert loaded.config == load_teacher(teacher).config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = loaded.sample(x, nfe=2)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("cache", [0, 6])
def test_class_conditional_teacher_distills_data_free(cache: int, tmp_path: Path) -> None:
    # As imagenet64 at toy scale: labels are the shape type; distillation reads no data, so
    # each solve gets a class drawn uniformly (stored beside the cached trajectories).
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    tiny = ["--set", "net.nf=8", "--set", "net.ch_mult=[1,2]", "--set", "net.num_classes=3",
            "--set", "data.use_labels=true", "--device", "cpu"]
    result = invoke("teacher", "train", "--preset", "shapes32", "--out", teacher, "--steps", "2",
                    "--set", "teacher.batch_size=4", *tiny)
    assert result.exit_code == 0, result.output
    result = invoke("distill", "--preset", "shapes32", "--teacher", teacher, "--out", student,
                    "--steps", "2", "--set", "distill.batch_size=2", "--set", "distill.grid_steps=2",
                    "--set", f"distill.trajectory_cache={cache}", "--device", "cpu")
    assert result.exit_code == 0, result.output
    if cache:
        from safetensors.torch import load_file

        bank = load_file(student / "teacher_trajectories.safetensors")
        assert bank["labels"].shape == (cache,) and int(bank["labels"].max()) < 3
    result = invoke("sample", student, "-n", "3", "--class", "2", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert load_student(student).config["num_classes"] == 3
