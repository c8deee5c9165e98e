"""Hot path of distillation: one TraFlow step against one plain flow-matching (teacher) step.

Both are whole optimisation steps as the jobs run them (forward, backward, clipped Adam, EMA
updates), on toy2d's MLP and on the shapes32-sized DDPM++ network.
"""

from __future__ import annotations

from pytest_benchmark.fixture import BenchmarkFixture


def _rounds(name: str) -> dict:
    return {"rounds": 10, "warmup_rounds": 1} if name == "toy2d" else {"rounds": 3,
                                                                       "warmup_rounds": 1}


def test_flow_matching_step(benchmark: BenchmarkFixture, setting) -> None:
    steps = setting.training_steps()
    benchmark.extra_info["images"] = steps.batch
    benchmark.pedantic(steps.teacher_step, **_rounds(setting.name))


def test_traflow_step(benchmark: BenchmarkFixture, setting) -> None:
    steps = setting.training_steps()
    benchmark.extra_info["images"] = steps.batch
    benchmark.extra_info["teacher_solve"] = "cached" if steps.trajectory is not None else "per step"
    benchmark.pedantic(steps.distill_step, **_rounds(setting.name))
