"""Pure samplers: the student at any time grid, the teacher by ODE; noise seeded per sample."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from traflow_cli.flow import EVALS_PER_STEP, RowVelocity, Velocity, solve_on_grid, solve_rk45
from traflow_cli.times import check_sampling_times
from traflow_cli.traflow import jump

TEACHER_SOLVERS = ("euler", "heun", "rk45")


def noise_for_indices(indices: Sequence[int], shape: Sequence[int], seed: int) -> Tensor:
    """Noise [B, *shape] where row b depends only on (seed, indices[b]); made on the CPU.

    numpy's PCG64 takes the pair (seed, index) as a 128-bit key; torch's CPU generator keeps
    only 32 bits of a seed, enough for two of 50,000 samples to share their noise.
    """
    rows = [np.random.Generator(np.random.PCG64([seed, int(i)])).standard_normal(
        tuple(shape), dtype=np.float32) for i in indices]
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty((0, *shape))


def student_times(nfe: int, times: Sequence[float] | None = None) -> Tensor:
    """Sampling times 0 = t_0 < ... < t_M = 1: uniform with M = nfe, or the given list."""
    if times is not None:
        grid = torch.tensor(list(times), dtype=torch.float32)
        # Checked as float32, the precision the jumps use: times that differ only in float64
        # would make a zero-length jump.
        check_sampling_times(grid.tolist(), nfe)
        return grid
    return torch.linspace(0.0, 1.0, nfe + 1)


@torch.no_grad()
def sample_student(net: nn.Module, noise: Tensor, times: Tensor, *, labels: Tensor | None = None,
                   gamma: float = 0.0, generator: torch.Generator | None = None,
                   fresh: Tensor | None = None) -> Tensor:
    """x <- G(x, t_n, t_(n+1)) from noise [B, ...]; len(times) - 1 network evaluations.

    gamma > 0 is CTM's gamma-sampling in rectified-flow form: jump past t_(n+1) to
    s' = t_(n+1) + gamma (1 - t_(n+1)), then move back to t_(n+1) along the path with fresh noise.
    The fresh noise of step n is fresh[:, n] when given ([B, len(times) - 2, ...], e.g. seeded
    per sample), else drawn from `generator`.
    """
    x = noise
    ones = torch.ones(noise.shape[0], device=noise.device)
    times = times.to(noise.device)
    last = len(times) - 2
    for n in range(len(times) - 1):
        t, s = times[n], times[n + 1]
        if gamma == 0.0 or n == last:
            x = jump(net, x, t * ones, s * ones, labels)
            continue
        s_far = s + gamma * (1 - s)
        x_far = jump(net, x, t * ones, s_far * ones, labels)
        # x_far = s' data + (1 - s') z; scale to s and top up the noise to variance (1 - s)^2.
        keep = s / s_far
        extra = torch.sqrt(torch.clamp((1 - s) ** 2 - (keep * (1 - s_far)) ** 2, min=0.0))
        if fresh is not None:
            z = fresh[:, n].to(x)
        elif generator is not None:
            z = torch.randn(x.shape, generator=generator, device=x.device)
        else:
            z = torch.randn_like(x)
        x = keep * x_far + extra * z
    return x


@torch.no_grad()
def sample_teacher(velocity: Velocity, noise: Tensor, *, solver: str = "euler", steps: int = 100,
                   rtol: float = 1e-5, atol: float = 1e-5) -> tuple[Tensor, int]:
    """Solve the teacher ODE from noise (t = 0) to data (t = 1); returns (samples, NFE used)."""
    if solver == "rk45":
        return solve_rk45(velocity, noise, rtol=rtol, atol=atol)
    if solver not in EVALS_PER_STEP:
        raise ValueError(f"solver must be one of {TEACHER_SOLVERS}, got {solver!r}")
    grid = torch.linspace(0.0, 1.0, steps + 1, device=noise.device)
    return solve_on_grid(velocity, noise, grid, method=solver), EVALS_PER_STEP[solver] * steps


def teacher_velocity(net: nn.Module, labels: Tensor | None = None) -> Velocity:
    """Bind class labels [B] (if any) so the teacher is a plain velocity(x [B, ...], t [B])."""
    if labels is None:
        return net
    return lambda x, t: net(x, t, class_labels=labels)


def teacher_row_velocity(net: nn.Module, labels: Tensor | None = None) -> RowVelocity:
    """velocity(x [A, ...], t [A], rows [A]) for the per-sample RK45 solver: the rows still
    being solved get their own labels from labels [B]."""
    return lambda x, t, rows: teacher_velocity(net, None if labels is None else labels[rows])(x, t)
