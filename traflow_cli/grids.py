"""Time grids in one place: every grid a solve or a jump runs on is defined here.

The teacher's solver grids (uniform in t, or EDM's Karras noise levels as times), where an EDM
teacher's grid starts (t_min = 1 / (1 + sigma_max), not 0), and the student's sampling times
(uniform, a given list, or points of the Karras grid it was distilled on). times.py keeps the
stdlib-only check of given sampling times, which the spec applies too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from traflow_cli.flow import EDM_SIGMA_MAX, EDM_SIGMA_MIN, time_of_sigma
from traflow_cli.times import check_sampling_times

# EDM's sampler spaces its noise levels with rho = 7 (flow.py holds its sigma range).
KARRAS_RHO = 7.0


def time_grid(num_steps: int, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform grid 0 = tau_0 < ... < tau_N = 1, [N + 1]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(0.0, 1.0, num_steps + 1, device=device, dtype=dtype)


def karras_grid(num_steps: int, *, sigma_min: float = EDM_SIGMA_MIN,
                sigma_max: float = EDM_SIGMA_MAX, rho: float = KARRAS_RHO,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """EDM's time steps as times: t_i = 1 / (1 + sigma_i) for i < N, then t_N = 1; [N + 1].

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    falls from sigma_max to sigma_min (N = 1: sigma_max alone); the last step goes to sigma = 0,
    the data end. Computed in float64, as EDM does, then cast.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    frac = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    times = torch.cat([1 / (1 + sigmas), torch.ones(1, dtype=torch.float64)])
    return times.to(device=device, dtype=dtype)


GRIDS = ("uniform", "karras")


def solver_grid(kind: str, num_steps: int, *, t_start: float = 0.0,
                sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX,
                rho: float = KARRAS_RHO, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Tensor:
    """A teacher's time grid [N + 1]: "uniform" from t_start to 1 (t_start = 0 is time_grid), or
    "karras" (EDM's noise levels between sigma_min and sigma_max; it starts at
    1 / (1 + sigma_max) whatever t_start is)."""
    if kind == "uniform":
        if t_start == 0.0:
            return time_grid(num_steps, device=device, dtype=dtype)
        return torch.linspace(t_start, 1.0, num_steps + 1, device=device, dtype=dtype)
    if kind == "karras":
        return karras_grid(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                           device=device, dtype=dtype)
    raise ValueError(f"grid must be one of {GRIDS}, got {kind!r}")


def student_times(nfe: int, times: Sequence[float] | None = None) -> Tensor:
    """Sampling times 0 = t_0 < ... < t_M = 1: uniform with M = nfe, or the given list."""
    if times is not None:
        grid = torch.tensor(list(times), dtype=torch.float32)
        # Checked as float32, the precision the jumps use: times that differ only in float64
        # would make a zero-length jump.
        check_sampling_times(grid.tolist(), nfe)
        return grid
    return torch.linspace(0.0, 1.0, nfe + 1)


# An EDM teacher's (sigma_lo, sigma_hi), the noise levels it is evaluated between (EDMNet's
# sigma_range); None for a rectified flow, whose velocity is defined on all of [0, 1].
SigmaRange = tuple[float, float] | None


def resolve_grid(choice: str, native: str) -> str:
    """"uniform" or "karras": a spec's time_grid choice, "native" being the run's own grid (an
    EDM teacher's Karras grid, the grid a student was distilled on)."""
    return native if choice == "native" else choice


def teacher_start_time(grid: str, sigma_range: SigmaRange) -> float:
    """Where a teacher solve starts: t = 0 for a rectified flow on a uniform grid, else
    t_min = 1 / (1 + sigma_max), where EDM's sampler starts (sigma_max = 80 unless the teacher's
    range ends lower)."""
    if sigma_range is None and grid == "uniform":
        return 0.0
    return time_of_sigma((sigma_range or (EDM_SIGMA_MIN, EDM_SIGMA_MAX))[1])


def rk45_start_time(grid: str, sigma_range: SigmaRange) -> float:
    """Where an adaptive (RK45) solve starts: t = 0 for a rectified flow whatever the grid,
    else where the EDM teacher's range begins."""
    return teacher_start_time(grid, sigma_range) if sigma_range is not None else 0.0


def teacher_grid(grid: str, steps: int, sigma_range: SigmaRange = None, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """A teacher's time grid [steps + 1]: "uniform" (from teacher_start_time to 1) or "karras"
    (EDM's noise levels in the teacher's range, or EDM's 0.002 .. 80 for a rectified flow)."""
    lo, hi = sigma_range or (EDM_SIGMA_MIN, EDM_SIGMA_MAX)
    return solver_grid(grid, steps, t_start=teacher_start_time(grid, sigma_range), sigma_min=lo,
                       sigma_max=hi, device=device, dtype=dtype)


def student_grid_times(nfe: int, grid: str, grid_steps: int, sigma_range: SigmaRange = None
                       ) -> Tensor:
    """A student's `nfe` jump times [nfe + 1], from where its teacher's solves started to 1.

    "uniform": evenly spaced in t (0, 1/nfe, ..., 1 for a rectified flow). "karras": points of
    the Karras grid the student was distilled on (`grid_steps` steps), at evenly spaced indices,
    since its consistency terms taught it to jump between exactly those points; more jumps
    than grid points take a Karras grid of `nfe` steps.
    """
    if grid == "karras":
        if nfe > grid_steps:
            return teacher_grid("karras", nfe, sigma_range)
        points = teacher_grid("karras", grid_steps, sigma_range)
        return points[torch.linspace(0, grid_steps, nfe + 1).round().long()]
    if grid != "uniform":
        raise ValueError(f"grid must be 'uniform' or 'karras', got {grid!r}")
    return torch.linspace(teacher_start_time("uniform", sigma_range), 1.0, nfe + 1)
