"""Hot path of distillation: one TraFlow step against one plain flow-matching (teacher) step.

Both are the jobs' own step functions (data, forward, backward, clipped Adam with the learning-rate
schedule, EMA updates), on toy2d's MLP and on the shapes32-sized DDPM++ network; the TraFlow step
reads the teacher's solves from a cache, as both presets train.
"""

from __future__ import annotations

from pytest_benchmark.fixture import BenchmarkFixture


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
