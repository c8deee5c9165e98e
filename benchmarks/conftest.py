"""Shared fixtures for the pytest-benchmark suites (`python -m pytest benchmarks --benchmark-only`).

Each setting is a preset's networks with fresh weights (speed does not depend on their values)
at a CPU-sized batch, in float32 and eager mode as CPU runs are. At the end of a run the
summary prints the ratios that matter: a TraFlow step against a plain flow-matching step, and
the student's 1-NFE sampling against the teacher's 100-step Euler.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from traflow_cli.engine.runtime import Runtime, setup_runtime
from traflow_cli.jobs.bench import (
    bench_batches,
    bench_models,
    distill_train_steps,
    teacher_train_step,
    training_spec,
)
from traflow_cli.jobs.common import sample_shape
from traflow_cli.presets import resolve_spec
from traflow_cli.seeding import generator_for
from traflow_cli.specs import RunSpec

# preset -> batch: the toy MLP at a size where matmuls dominate; the shapes32 DDPM++ small.
SETTINGS = {"toy2d": 1024, "shapes32": 8}


@dataclass
class Setting:
    name: str
    spec: RunSpec
    runtime: Runtime
    teacher: nn.Module
    student: nn.Module
    config: dict
    noise: Tensor

    def training_steps(self) -> dict[str, Callable[[], object]]:
        """The jobs' own training steps (bench.py's train rows), each a call that runs the next
        step number: "teacher", and "distill cached" / "distill per step" as the preset allows."""
        batch = len(self.noise)
        spec = training_spec(self.spec, self.config, batch)
        batches, data = bench_batches(spec, self.runtime, batch)
        runs = [teacher_train_step(spec, self.runtime, batches, data),
                *distill_train_steps(spec, self.runtime, self.teacher, batches, data)]
        return {_step_name(run.fields): _numbered(run.step_fn) for run in runs}


def _step_name(fields: dict) -> str:
    if "teacher_solve" not in fields:
        return "teacher"
    return f"distill {fields['teacher_solve']}"


def _numbered(step_fn: Callable[[int], object]) -> Callable[[], object]:
    steps = itertools.count()
    return lambda: step_fn(next(steps))


@pytest.fixture(scope="session", params=list(SETTINGS))
def setting(request: pytest.FixtureRequest) -> Setting:
    name = request.param
    spec = resolve_spec(name, [f"bench.batch_size={SETTINGS[name]}"], {"runtime.device": "cpu"})
    runtime = setup_runtime(device="cpu", image_model=not spec.data.is_toy)
    teacher, student, config = bench_models(spec, None, None, runtime)
    gen = generator_for(spec.seed, 8)
    noise = torch.randn((SETTINGS[name], *sample_shape(config)), generator=gen)
    return Setting(name, spec, runtime, teacher, student, config, noise)


def _mean_s(bench: object) -> float | None:
    stats = getattr(bench, "stats", None)
    stats = getattr(stats, "stats", stats)
    return getattr(stats, "mean", None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Ratios of mean times between the benchmarks that were run (same process, same machine)."""
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    found = {b.name: _mean_s(b) for b in getattr(session, "benchmarks", [])}
    lines = []
    for name in SETTINGS:
        pairs = [("TraFlow step / flow-matching step (time)",
                  f"test_traflow_step[{name}]", f"test_flow_matching_step[{name}]"),
                 ("teacher 100-step Euler / student 1-NFE (time)",
                  f"test_teacher_euler_100[{name}]", f"test_student_sampler[{name}-1]"),
                 *[(f"dG/ds by {how} / a plain jump (time, forward + backward)",
                    f"test_velocity_derivative[{name}-{how}]",
                    f"test_velocity_derivative[{name}-plain jump]") for how in ("jvp", "fd")]]
        for label, num, den in pairs:
            if found.get(num) and found.get(den):
                lines.append(f"{name}: {label} = {found[num] / found[den]:.1f}")
    if lines:
        terminalreporter.section("traflow benchmark ratios")
        for line in lines:
            terminalreporter.write_line(line)
