"""NFE has one definition (flow.solve_evals, sampling.teacher_nfe), and what `traflow sample`
reports is the number of network evaluations it made, for rectified flows and EDM teachers alike
(an EDM teacher's Heun takes its last step by Euler, as EDM's sampler: 2N - 1, not 2N)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import EDM_FIXTURES, invoke

from traflow_cli.flow import evals_on_grid, solve_evals
from traflow_cli.grids import karras_grid, time_grid
from traflow_cli.jobs import sample as sample_job
from traflow_cli.models import load_teacher
from traflow_cli.sampling import sample_teacher, teacher_nfe, teacher_velocity


@pytest.fixture(scope="module")
def edm_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nfe") / "teacher"
    result = invoke("teacher", "import", "edm", EDM_FIXTURES / "edm_ddpmpp_small.pkl",
                    "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_one_definition() -> None:
    assert [teacher_nfe("euler", 5), teacher_nfe("heun", 5)] == [5, 10]
    assert teacher_nfe("euler", 5, (0.002, 80.0)) == 5
    assert teacher_nfe("heun", 5, (0.002, 80.0)) == 9  # the step to sigma = 0 is Euler
    assert solve_evals("heun_sigma", 18) == evals_on_grid("heun_sigma", karras_grid(18)) == 35
    assert solve_evals("heun", 18) == evals_on_grid("heun", time_grid(18)) == 36
    # A heun_sigma solve that stops short of the data end pays 2 evaluations every step.
    assert evals_on_grid("heun_sigma", karras_grid(4)[:-1]) == 6


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = sample_job.load_model

    def counting(run_dir, device):
        model = real(run_dir, device)
        model.net.register_forward_hook(lambda *_: calls.append(1))
        return model

    monkeypatch.setattr(sample_job, "load_model", counting)
    return calls


@pytest.mark.parametrize(("solver", "grid", "expected"),
                         [("heun", "native", 5), ("heun", "uniform", 5), ("euler", "native", 3)])
def test_sample_reports_the_evaluations_an_edm_teacher_made(
        edm_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, solver: str,
        grid: str, expected: int) -> None:
    calls = _counted(monkeypatch)
    result = invoke("sample", edm_teacher, "--solver", solver, "--steps", "3", "-n", "4",
                    "--batch-size", "2", "--time-grid", grid, "--out", tmp_path / "s", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["nfe"] == out["nfe_max"] == expected
    assert len(calls) == 2 * expected  # two batches, each solved once
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["nfe"] == expected


def test_the_api_counts_as_sample_does(edm_teacher: Path) -> None:
    teacher = load_teacher(edm_teacher)
    calls: list[int] = []
    teacher.net.register_forward_hook(lambda *_: calls.append(1))
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    _, nfe = sample_teacher(teacher_velocity(teacher), noise, solver="heun", steps=4,
                            grid="karras", sigma_range=teacher.sigma_range)
    assert nfe == len(calls) == 7
