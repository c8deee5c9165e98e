"""Hot path of distillation: one TraFlow step against one plain flow-matching (teacher) step.

Both are the jobs' own step functions (data, forward, backward, clipped Adam with the learning-rate
schedule, EMA updates), on toy2d's MLP and on the shapes32-sized DDPM++ network; the TraFlow step
reads the teacher's solves from a cache, as both presets train.
"""

from __future__ import annotations

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from traflow_cli.objectives.shared import jump, jump_derivative


def _rounds(name: str) -> dict:
    return {"rounds": 10, "warmup_rounds": 1} if name == "toy2d" else {"rounds": 3,
                                                                       "warmup_rounds": 1}


def test_flow_matching_step(benchmark: BenchmarkFixture, setting) -> None:
    benchmark.extra_info["images"] = len(setting.noise)
    benchmark.pedantic(setting.training_steps()["teacher"], **_rounds(setting.name))


def test_traflow_step(benchmark: BenchmarkFixture, setting) -> None:
    benchmark.extra_info["images"] = len(setting.noise)
    benchmark.extra_info["teacher_solve"] = "cached"
    benchmark.pedantic(setting.training_steps()["distill cached"], **_rounds(setting.name))


@pytest.mark.parametrize("how", ["plain jump", "jvp", "fd"])
def test_velocity_derivative(benchmark: BenchmarkFixture, setting, how: str) -> None:
    """L_vel's dG/ds (forward mode, or a central difference: distill.derivative) forward and
    backward into the student's weights, against one plain jump G(x, t, s) of the same rows."""
    student = setting.student.requires_grad_(True).train()
    gen = torch.Generator().manual_seed(0)
    x, r = setting.noise, torch.rand(len(setting.noise), generator=gen)
    s = r + (1 - r) * torch.rand(len(r), generator=gen)

    def run() -> None:
        out = (jump(student, x, r, s) if how == "plain jump" else
               jump_derivative(student, x, r, s, method=how))
        out.square().mean().backward()
        student.zero_grad(set_to_none=True)

    benchmark.extra_info["images"] = len(x)
    benchmark.pedantic(run, **_rounds(setting.name))
