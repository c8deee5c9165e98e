"""Rectified-flow conventions and solvers against fields with known solutions."""

from __future__ import annotations

import math

import pytest
import torch

from traflow_cli.flow import (
    interpolate,
    pick,
    rectified_flow_loss,
    solve_on_grid,
    solve_rk45,
    target_velocity,
    trajectory_on_grid,
)
from traflow_cli.grids import time_grid
from traflow_cli.sampling import sample_teacher


def exponential_field(rate: float):
    return lambda x, t: rate * x  # dx/dt = a x  ->  x(1) = x(0) e^a


def test_path_runs_from_noise_at_zero_to_data_at_one() -> None:
    noise, data = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(interpolate(noise, data, torch.zeros(4)), noise)
    assert torch.equal(interpolate(noise, data, torch.ones(4)), data)
    mid = interpolate(noise, data, torch.full((4,), 0.25))
    assert torch.allclose(mid, 0.25 * data + 0.75 * noise)
    assert torch.equal(target_velocity(noise, data), data - noise)


def test_rectified_flow_loss_is_zero_for_the_true_straight_velocity() -> None:
    noise, data = torch.randn(8, 2), torch.randn(8, 2)
    # With one fixed pair per row the straight velocity is known exactly: data - noise.
    oracle = lambda x, t: data - noise  # noqa: E731
    loss = rectified_flow_loss(oracle, noise, data, torch.rand(8))
    assert loss.shape == (8,) and float(loss.max()) == 0.0


def test_one_euler_step_is_exact_on_a_constant_field() -> None:
    x0 = torch.randn(5, 2)
    out = solve_on_grid(lambda x, t: torch.full_like(x, 3.0), x0, time_grid(1), method="euler")
    assert torch.allclose(out, x0 + 3.0)


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("heun", 2)])
def test_fixed_step_solvers_converge_at_their_order(method: str, order: int) -> None:
    x0 = torch.ones(1, 1, dtype=torch.float64)
    exact = math.exp(1.0)
    errors = [abs(float(solve_on_grid(exponential_field(1.0), x0,
                                      time_grid(n, dtype=torch.float64), method=method)) - exact)
              for n in (20, 40)]
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.1)


def test_rk45_reaches_tolerance_and_reports_its_evaluations() -> None:
    x0 = torch.ones(3, 2, dtype=torch.float64)
    out, nfe = solve_rk45(exponential_field(-2.0), x0, rtol=1e-8, atol=1e-8)
    assert torch.allclose(out, x0 * math.exp(-2.0), rtol=1e-6)
    assert nfe > 6 and (nfe - 1) % 6 == 0  # one first evaluation, then 6 per step tried


def test_sample_teacher_reports_nfe_for_each_solver() -> None:
    noise = torch.randn(2, 2)
    assert sample_teacher(exponential_field(0.5), noise, solver="euler", steps=7)[1] == 7
    assert sample_teacher(exponential_field(0.5), noise, solver="heun", steps=7)[1] == 14


def test_trajectory_with_per_sample_starts_equals_separate_solves() -> None:
    grid = time_grid(6, dtype=torch.float64)
    field = lambda x, t: torch.sin(x) + t[:, None]  # noqa: E731
    x = torch.randn(3, 2, dtype=torch.float64)
    start = torch.tensor([0, 2, 5])
    traj = trajectory_on_grid(field, x, start, grid, method="heun")
    assert traj.shape == (7, 3, 2)
    for b in range(3):
        alone = solve_on_grid(field, x[b:b + 1], grid[start[b]:], method="heun")
        assert torch.allclose(traj[-1, b], alone[0])
        assert torch.equal(pick(traj, start)[b], x[b])  # the state at its own start is x
