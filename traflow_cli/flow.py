"""Rectified-flow conventions in one place (METHOD.md, "Conventions").

t = 0 is noise, t = 1 is data; x_t = t * data + (1 - t) * noise; the velocity of that path is
data - noise. Solvers integrate dx/dt = v(x, t) for any callable v(x [B, ...], t [B]) -> [B, ...].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor], Tensor]

# Rectified Flow trains on t ~ U[eps, 1] (METHOD.md); the endpoint is kept out of the draw.
TRAIN_EPS = 1e-3


def per_sample(t: Tensor, like: Tensor) -> Tensor:
    """Reshape times [B] to broadcast against x [B, ...]."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(noise: Tensor, data: Tensor, t: Tensor) -> Tensor:
    """x_t = t * data + (1 - t) * noise, with t [B] and noise, data [B, ...]."""
    tb = per_sample(t, noise)
    return tb * data + (1 - tb) * noise


def target_velocity(noise: Tensor, data: Tensor) -> Tensor:
    """Velocity of the straight path from noise to data: data - noise."""
    return data - noise


def sample_train_times(batch: int, generator: torch.Generator, device: torch.device,
                       eps: float = TRAIN_EPS) -> Tensor:
    """t ~ U[eps, 1] for rectified-flow training, [B]."""
    u = torch.rand(batch, generator=generator, device=generator.device).to(device)
    return eps + (1 - eps) * u


def rectified_flow_loss(velocity: Velocity, noise: Tensor, data: Tensor, t: Tensor) -> Tensor:
    """Per-sample ||v(x_t, t) - (data - noise)||^2 averaged over non-batch dims, [B]."""
    pred = velocity(interpolate(noise, data, t), t)
    err = (pred - target_velocity(noise, data)) ** 2
    return err.flatten(1).mean(1)


def euler_step(velocity: Velocity, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One Euler step from t [B] to s [B]."""
    return x + per_sample(s - t, x) * velocity(x, t)


def heun_step(velocity: Velocity, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One Heun (explicit trapezoid) step from t [B] to s [B]: 2 evaluations."""
    h = per_sample(s - t, x)
    v0 = velocity(x, t)
    v1 = velocity(x + h * v0, s)
    return x + 0.5 * h * (v0 + v1)


def heun_sigma_step(velocity: Velocity, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One Heun step in EDM's coordinates from t [B] to s [B], 0 < t < s <= 1: 2 evaluations.

    With y = x / t and sigma = (1 - t) / t, dx/dt = v(x, t) becomes dy/dsigma = t (y - v(x, t)),
    which is EDM's (y - D) / sigma for the denoiser D = x + (1 - t) v. The trapezoid is taken in
    sigma, as EDM's sampler does (a Heun step in t is a different, less accurate step for these
    teachers). A step to s = 1 (sigma = 0, the data end) is Euler, 1 evaluation, as in EDM: its
    correction would evaluate the teacher at sigma = 0. An Euler step is the same in both
    coordinates. Needs t > 0: start the solve at t_min = 1 / (1 + sigma_max), not at 0.
    """
    last = s >= 1
    flags = torch.stack([(t <= 0).any(), last.all()]).tolist()
    if flags[0]:
        raise ValueError("heun_sigma steps need t > 0; start the grid at 1 / (1 + sigma_max)")
    tb, sb = per_sample(t, x), per_sample(s, x)
    y = x / tb
    h = (1 - sb) / sb - (1 - tb) / tb  # sigma_s - sigma_t (negative)
    d0 = tb * (y - velocity(x, t))  # dy/dsigma at t
    y_euler = y + h * d0
    if flags[1]:
        return sb * y_euler
    d1 = sb * (y_euler - velocity(sb * y_euler, s))
    y_heun = y + 0.5 * h * (d0 + d1)
    return torch.where(per_sample(last, x).bool(), sb * y_euler, sb * y_heun)


STEPPERS = {"euler": euler_step, "heun": heun_step, "heun_sigma": heun_sigma_step}
EVALS_PER_STEP = {"euler": 1, "heun": 2, "heun_sigma": 2}


def solve_evals(method: str, steps: int, *, to_data_end: bool = True) -> int:
    """Velocity evaluations (NFE) of one `steps`-step solve by `method`: the one definition.

    Euler costs 1 per step and Heun 2; Heun in EDM's coordinates ("heun_sigma") takes its step
    to t = 1 by Euler (heun_sigma_step, as EDM's sampler), so a solve that ends at the data end
    costs 2N - 1.
    """
    if method == "heun_sigma" and steps and to_data_end:
        return 2 * steps - 1
    return EVALS_PER_STEP[method] * steps


def evals_on_grid(method: str, grid: Tensor) -> int:
    """Velocity evaluations of one solve on `grid` [N + 1] (see solve_evals)."""
    return solve_evals(method, len(grid) - 1, to_data_end=len(grid) > 1 and float(grid[-1]) >= 1)


# EDM's sampler (Karras et al. 2022) works between these noise levels with rho = 7; an EDM
# teacher is only evaluated inside them (and inside its own training range).
EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0


def time_of_sigma(sigma: float) -> float:
    """The time whose EDM noise level is sigma: t = 1 / (1 + sigma) (sigma = (1 - t) / t)."""
    return 1.0 / (1.0 + sigma)


def solve_on_grid(velocity: Velocity, x: Tensor, grid: Tensor, *, method: str = "heun") -> Tensor:
    """Integrate from grid[0] to grid[-1] with one fixed step per interval; returns x at grid[-1]."""
    step = STEPPERS[method]
    ones = torch.ones(x.shape[0], device=x.device, dtype=grid.dtype)
    for n in range(len(grid) - 1):
        x = step(velocity, x, grid[n] * ones, grid[n + 1] * ones)
    return x


@torch.no_grad()
def trajectory_on_grid(velocity: Velocity, x_start: Tensor, start_index: Tensor, grid: Tensor,
                       *, method: str = "heun") -> Tensor:
    """Teacher states at every grid point, each sample starting at its own index.

    x_start [B, ...] sits at grid[start_index] (start_index [B], int). Returns [N + 1, B, ...];
    entries before a sample's start hold its start state. Samples that have not started yet are
    carried along unchanged, so one batched solve serves every start index.
    """
    step = STEPPERS[method]
    batch = x_start.shape[0]
    ones = torch.ones(batch, device=x_start.device, dtype=grid.dtype)
    states = [x_start]
    x = x_start
    first = int(start_index.min())
    for _ in range(first):
        states.append(x)
    for n in range(first, len(grid) - 1):
        moved = step(velocity, x, grid[n] * ones, grid[n + 1] * ones)
        started = per_sample(start_index <= n, x).bool()
        x = torch.where(started, moved, x)
        states.append(x)
    return torch.stack(states)


def pick(trajectory: Tensor, index: Tensor) -> Tensor:
    """Per-sample state trajectory[index[b], b]: [N + 1, B, ...] x [B] -> [B, ...]."""
    return trajectory[index, torch.arange(trajectory.shape[1], device=trajectory.device)]


# Dormand-Prince 5(4) tableau: the adaptive RK45 that scipy's solve_ivp (used by the official
# Rectified Flow sampler) runs by default.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
# 5th-order weights minus the embedded 4th-order ones: the local error estimate.
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _dopri_trial(velocity: Velocity, x: Tensor, k1: Tensor, t: Tensor, h: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """One trial Dormand-Prince step of size h [B] from time t [B] (float64), given k1 = v(x, t).

    Returns (x at t + h [B, ...], local error estimate [B, ...], v at t + h: the next k1).
    The solvers differ only in how they norm the error and control the step.
    """
    hx = per_sample(h, x)
    ks = [k1]
    for i in range(1, 7):
        xi = x + hx * sum(a * k for a, k in zip(_DP_A[i], ks, strict=False) if a != 0.0)
        ks.append(velocity(xi, (t + _DP_C[i] * h).float()))
    x_new = x + hx * sum(b * k for b, k in zip(_DP_A[6], ks, strict=False) if b != 0.0)
    err = hx * sum(e * k for e, k in zip(_DP_E, ks, strict=False) if e != 0.0)
    return x_new, err, ks[6]


@torch.no_grad()
def solve_rk45(velocity: Velocity, x: Tensor, *, t0: float = 0.0, t1: float = 1.0,
               rtol: float = 1e-5, atol: float = 1e-5, max_evals: int = 10_000) -> tuple[Tensor, int]:
    """Adaptive Dormand-Prince from t0 to t1 with one step size for the batch; returns (x, NFE).

    The error norm is the RMS over the whole batch (as scipy does for the flattened state used
    by the official Rectified Flow sampler), so results do not depend on per-sample control.
    """
    batch = x.shape[0]
    t = t0
    h = 0.01 * (t1 - t0)
    k1 = velocity(x, torch.full((batch,), t, device=x.device))
    nfe = 1
    while t < t1 - 1e-12:
        h = min(h, t1 - t)
        x_new, err, k_last = _dopri_trial(
            velocity, x, k1, torch.full((batch,), t, dtype=torch.float64, device=x.device),
            torch.full((batch,), h, dtype=torch.float64, device=x.device))
        nfe += 6
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        err_norm = float(torch.sqrt(torch.mean((err / scale) ** 2)))
        if err_norm <= 1.0:
            t += h
            x = x_new
            k1 = k_last  # first-same-as-last: the last stage is the next step's first
        factor = 0.9 * err_norm ** (-1 / 5) if err_norm > 0 else 10.0
        h *= min(10.0, max(0.2, factor))
        if nfe > max_evals:
            raise RuntimeError(f"RK45 used more than {max_evals} evaluations; loosen rtol/atol")
    return x, nfe


# velocity(x [A, ...], t [A], rows [A]) -> [A, ...]; rows index the A active samples in the batch.
RowVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]


@torch.no_grad()
def solve_rk45_per_sample(velocity: RowVelocity, x: Tensor, *, t0: float = 0.0, t1: float = 1.0,
                          rtol: float = 1e-5, atol: float = 1e-5,
                          max_evals: int = 10_000) -> tuple[Tensor, Tensor]:
    """Dormand-Prince from t0 to t1 with a step size for each sample; returns (x, NFE [B]).

    Each sample's error norm is the RMS over its own elements (solve_rk45 pools the batch), so
    its steps, and its result, do not depend on which samples share its batch. Finished samples
    leave the batch; `rows` tells the velocity which samples it gets (e.g. to pick their labels).
    """
    batch = x.shape[0]
    x = x.clone()
    t = torch.full((batch,), t0, dtype=torch.float64, device=x.device)
    h = torch.full_like(t, 0.01 * (t1 - t0))
    nfe = torch.ones(batch, dtype=torch.long, device=x.device)
    rows = torch.arange(batch, device=x.device)
    k1 = velocity(x, t.float(), rows)
    while rows.numel():
        xa, ta, k1a = x[rows], t[rows], k1[rows]
        ha = torch.minimum(h[rows], t1 - ta)  # [A]
        x_new, err, k_last = _dopri_trial(lambda x_, t_, r=rows: velocity(x_, t_, r),
                                          xa, k1a, ta, ha)
        nfe[rows] += 6
        scale = atol + rtol * torch.maximum(xa.abs(), x_new.abs())
        err_norm = ((err / scale) ** 2).flatten(1).mean(1).sqrt().double()  # [A]
        ok = err_norm <= 1.0
        x[rows[ok]] = x_new[ok]
        k1[rows[ok]] = k_last[ok]  # first-same-as-last: the last stage is the next step's first
        t[rows[ok]] = ta[ok] + ha[ok]
        factor = torch.where(err_norm > 0, 0.9 * err_norm.clamp(min=1e-300) ** (-1 / 5), 10.0)
        h[rows] = ha * factor.clamp(0.2, 10.0)
        if int(nfe.max()) > max_evals:
            raise RuntimeError(f"RK45 used more than {max_evals} evaluations; loosen rtol/atol")
        rows = rows[t[rows] < t1 - 1e-12]
    return x, nfe
