"""Hot path of generation: the student's few-jump sampler against the teacher's ODE solvers."""

from __future__ import annotations

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from traflow_cli.grids import student_times
from traflow_cli.sampling import sample_student, sample_teacher


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_student_sampler(benchmark: BenchmarkFixture, setting, nfe: int) -> None:
    times = student_times(nfe)
    benchmark.extra_info["images"] = len(setting.noise)
    rounds = 20 if setting.name == "toy2d" else 5
    with torch.no_grad():
        benchmark.pedantic(sample_student, args=(setting.student, setting.noise, times),
                           rounds=rounds, warmup_rounds=1)


def test_teacher_euler_100(benchmark: BenchmarkFixture, setting) -> None:
    benchmark.extra_info["images"] = len(setting.noise)
    with torch.no_grad():
        benchmark.pedantic(sample_teacher, args=(setting.teacher, setting.noise),
                           kwargs={"solver": "euler", "steps": 100}, rounds=3, warmup_rounds=1)


def test_teacher_rk45(benchmark: BenchmarkFixture, setting) -> None:
    benchmark.extra_info["images"] = len(setting.noise)
    _, nfe = sample_teacher(setting.teacher, setting.noise, solver="rk45")
    benchmark.extra_info["nfe"] = nfe
    with torch.no_grad():
        benchmark.pedantic(sample_teacher, args=(setting.teacher, setting.noise),
                           kwargs={"solver": "rk45"}, rounds=2, warmup_rounds=0)
