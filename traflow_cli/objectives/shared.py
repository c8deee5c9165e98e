"""What every objective shares (METHOD.md): the student's jump, the time draw, the teacher's
states on its grid and between grid points, distances, and one batch's inputs.

Notation follows METHOD.md: t = 0 is noise, t = 1 is data; the student jumps with
G(x_t, t, s) = x_t + (s - t) * u(x_t, t, s); G^- is the student with its target-EMA weights;
Phi is the teacher's ODE solve on the grid tau_0 < ... < tau_N = 1 (tau_0 = 0 for a uniform grid;
a grid may start above 0, and the solve then starts there from (1 - tau_0) * noise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from traflow_cli.flow import (
    STEPPERS,
    TRAIN_EPS,
    Velocity,
    per_sample,
    pick,
    sample_train_times,
    trajectory_on_grid,
)


@dataclass
class ObjectiveLoss:
    """The scalar to minimise and each term, detached, for logging: `total.backward()` (or
    `backward()`) gives d total / d weights."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    def backward(self) -> None:
        """d total / d weights into the weights' .grad."""
        self.total.backward()


def call_net(net: nn.Module, x: Tensor, t: Tensor, s: Tensor | None = None,
             labels: Tensor | None = None) -> Tensor:
    """net(x, t[, s]) with class labels passed only to conditional networks."""
    args = (x, t) if s is None else (x, t, s)
    return net(*args) if labels is None else net(*args, class_labels=labels)


def jump(net: nn.Module, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None = None) -> Tensor:
    """G(x, t, s) = x + (s - t) * u(x, t, s); x [B, ...], t, s [B]. G(x, t, t) = x exactly."""
    return x + per_sample(s - t, x) * call_net(net, x, t, s, labels)


def jump_rows(net: nn.Module, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None = None,
              rows: Tensor | None = None) -> Tensor:
    """G(x, t, s) [B, ...] with only `rows` [M] (those where s != t) through the network: the
    others are G(x, t, t) = x exactly, so they cost nothing (and pass gradients unchanged)."""
    if rows is None or len(rows) == len(x):
        return jump(net, x, t, s, labels)
    if len(rows) == 0:
        return x
    moved = jump(net, x[rows], t[rows], s[rows], None if labels is None else labels[rows])
    return x.index_copy(0, rows, moved.to(x.dtype))


def jump_derivative(net: nn.Module, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None = None,
                    *, method: str = "jvp", fd_step: float = 1e-4) -> Tensor:
    """dG(x, t, s)/ds = u + (s - t) du/ds, image-shaped [B, ...] (METHOD.md, target 2)."""
    return jump_and_derivative(net, x, t, s, labels, method=method, fd_step=fd_step)[1]


def jump_and_derivative(net: nn.Module, x: Tensor, t: Tensor, s: Tensor,
                        labels: Tensor | None = None, *, method: str = "jvp",
                        fd_step: float = 1e-4) -> tuple[Tensor, Tensor]:
    """(G(x, t, s), dG/ds), both [B, ...]. By "fd", G is the mean of the two differenced jumps
    (off by O(fd_step^2)); the derivative stays differentiable in the weights either way."""
    if method == "jvp":
        # Forward mode, tangent 1 on s: one pass gives the jump and its per-sample derivative.
        def along_s(s_: Tensor) -> Tensor:
            return jump(net, x, t, s_, labels)

        landing, derivative = torch.func.jvp(along_s, (s,), (torch.ones_like(s),))
        return landing, derivative
    if method == "fd":
        # Two plain passes (2.6x cheaper than forward mode through a U-Net on a CPU); float32
        # only: in bf16 or TF32 the difference of two jumps 2 * fd_step apart is rounding noise.
        # One batched call at s + h and s - h; the difference is taken of G - x = (s - t) u, as
        # x cancels exactly and would only add its rounding.
        both_s = torch.cat([s + fd_step, s - fd_step])
        moves = (per_sample(both_s - torch.cat([t, t]), x)
                 * call_net(net, torch.cat([x, x]), torch.cat([t, t]), both_s, repeat_labels(labels)))
        ahead, behind = moves.chunk(2)
        return x + 0.5 * (ahead + behind), (ahead - behind) / (2 * fd_step)
    raise ValueError(f"derivative must be 'jvp' or 'fd', got {method!r}")


def sample_grid_indices(num_steps: int, batch: int, generator: torch.Generator
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """CTM's draw, per sample: k in {1..N} with P(k) ~ k, i ~ U{0..N-k}, j ~ U{i+k..N}. [B] each."""
    dev = generator.device
    weights = torch.arange(1, num_steps + 1, dtype=torch.float32, device=dev)
    k = torch.multinomial(weights, batch, replacement=True, generator=generator) + 1
    i = (torch.rand(batch, generator=generator, device=dev) * (num_steps - k + 1)).long()
    first_j = i + k
    j = first_j + (torch.rand(batch, generator=generator, device=dev)
                   * (num_steps - first_j + 1)).long()
    return i, k, j


@dataclass
class TimeDraw:
    """All the randomness of one loss call except the noise, so that it can be injected."""

    i: Tensor      # [B] start index on the teacher grid: t = tau_i
    k: Tensor      # [B] teacher steps for self-consistency: u = tau_(i+k)
    j: Tensor      # [B] target index: s = tau_j
    r: Tensor      # [B] chord time for L_vel
    s_vel: Tensor  # [B] jump target for L_vel, r <= s_vel <= 1
    t_fm: Tensor   # [B] time of the flow-matching anchor
    vel: Tensor    # [B] bool: the rows that carry L_vel (every vel_every-th of the global batch)
    # consistency_times="jittered": where in its grid cell each of tau_i, tau_(i+k), tau_j moves
    # [3, B] in [0, 1) (0.5 is the grid point itself); None on the grid.
    jitter: Tensor | None = None
    # Two-time objectives (lagrangian, eulerian): [B] bool, the rows whose jump ends where it
    # starts (s = r: the pure velocity condition); None when no row does.
    diagonal: Tensor | None = None

    def rows(self, index: slice | Tensor) -> TimeDraw:
        """The draw for a subset of the batch (a rank's share under DDP)."""
        return TimeDraw(**{name: None if getattr(self, name) is None else
                           getattr(self, name)[..., index] if name == "jitter" else
                           getattr(self, name)[index] for name in self.__dataclass_fields__})


def draw_times(grid: Tensor, batch: int, generator: torch.Generator, *,
               vel_every: int = 1, jittered: bool = False,
               jitter_generator: torch.Generator | None = None, diagonal: float = 0.0,
               diagonal_generator: torch.Generator | None = None) -> TimeDraw:
    """Draw every time of a TraFlow loss for a batch from one generator, on the teacher's grid
    [N + 1] (pass it on the host: its first time is read). Every time lies in [grid[0], 1].
    Rows 0, vel_every, 2 vel_every, ... of the batch carry L_vel (the draw is the same).
    `jittered` draws the consistency times' positions within their cells from
    `jitter_generator` (default: `generator`, after everything else), so that the draw on the
    grid, and what a caller draws next from `generator`, are the same with and without it.
    `diagonal` is the fraction of rows whose (r, s_vel) pair is set to (r, r), drawn from
    `diagonal_generator` (default: `generator`, after everything else) in the same way."""
    i, k, j = sample_grid_indices(len(grid) - 1, batch, generator)
    dev = generator.device
    t_min = float(grid[0])
    r = torch.rand(batch, generator=generator, device=dev)
    if t_min > 0:
        r = t_min + (1 - t_min) * r
    s_vel = r + (1 - r) * torch.rand(batch, generator=generator, device=dev)
    t_fm = sample_train_times(batch, generator, dev, eps=max(TRAIN_EPS, t_min))
    vel = torch.arange(batch, device=dev) % vel_every == 0
    jitter = (torch.rand(3, batch, generator=jitter_generator or generator, device=dev)
              if jittered else None)
    on_diagonal = (torch.rand(batch, generator=diagonal_generator or generator, device=dev)
                   < diagonal if diagonal > 0 else None)
    return TimeDraw(i=i, k=k, j=j, r=r, s_vel=s_vel, t_fm=t_fm, vel=vel, jitter=jitter,
                    diagonal=on_diagonal)


def cell_time(grid: Tensor, index: Tensor, where: Tensor) -> Tensor:
    """A time in grid point `index`'s cell [B]: from the midpoint with the point below to the
    midpoint with the point above, at fraction `where` [B] in [0, 1). The end points stay put
    (t = grid[0] is where sampling starts, 1 is the data end), and cells do not overlap, so
    times drawn for increasing indices stay in order."""
    last = len(grid) - 1
    below = grid[(index - 1).clamp(min=0)]
    above = grid[(index + 1).clamp(max=last)]
    low, high = (below + grid[index]) / 2, (grid[index] + above) / 2
    inner = (index > 0) & (index < last)
    return torch.where(inner, low + where.to(grid.dtype) * (high - low), grid[index])


def distance(a: Tensor, b: Tensor, kind: str = "l2", huber_c: float = 0.03) -> Tensor:
    """Per-sample distance [B]: mean squared error, or pseudo-Huber sqrt(mse + c^2) - c."""
    mse = ((a - b) ** 2).flatten(1).mean(1)
    if kind == "l2":
        return mse
    if kind == "pseudo_huber":
        return torch.sqrt(mse + huber_c**2) - huber_c
    raise ValueError(f"distance must be 'l2' or 'pseudo_huber', got {kind!r}")


def start_state(noise: Tensor, t_start: float | Tensor) -> Tensor:
    """The path's state at t_start for this noise, ignoring the data term: (1 - t_start) * noise
    (the noise itself at 0); where a teacher's ODE starts (grid[0]), without a host sync."""
    return (1 - t_start) * noise


@torch.no_grad()
def trajectory_from_noise(teacher: Velocity, noise: Tensor, grid: Tensor, method: str) -> Tensor:
    """The teacher's states on the whole grid [N + 1, B, ...] from noise [B, ...], starting at
    grid[0] (a trajectory cache's rows, or a batch's data-free solve)."""
    starts = torch.zeros(len(noise), dtype=torch.long, device=noise.device)
    return trajectory_on_grid(teacher, start_state(noise, grid[0]), starts, grid, method=method)


@torch.no_grad()
def step_off_grid(teacher: Velocity, states: Tensor, at: Tensor, to: Tensor, method: str,
                  labels: Tensor | None = None) -> Tensor:
    """Teacher states [B, ...] at times `at` [B] carried by one `method` step to times `to` [B]
    (a state between grid points, reached from the nearest grid state). Rows already there are
    kept as they are; without class labels only the rows that move are evaluated."""
    moving = torch.nonzero(at != to).squeeze(1)
    if len(moving) == 0:
        return states
    step = STEPPERS[method]
    if labels is not None:  # the teacher's labels are bound to the whole batch
        moved = step(teacher, states, at, to)
        return torch.where(per_sample(at != to, states).bool(), moved, states)
    moved = step(teacher, states[moving], at[moving], to[moving])
    return states.index_copy(0, moving, moved.to(states.dtype))


def nearest_grid_index(grid: Tensor, times: Tensor) -> Tensor:
    """The index of the grid point nearest to each time [B] (times within [grid[0], 1])."""
    return (grid[None, :] - times[:, None]).abs().argmin(dim=1)


def repeat_labels(labels: Tensor | None) -> Tensor | None:
    return None if labels is None else torch.cat([labels, labels])


@torch.no_grad()
def teacher_state_at(teacher: Velocity, trajectory: Tensor, grid: Tensor, times: Tensor,
                     method: str, labels: Tensor | None = None) -> Tensor:
    """The teacher's state at continuous times [B] on each row's trajectory [N + 1, B, ...]:
    one `method` step from the nearest grid state (a grid time is read as it is)."""
    near = nearest_grid_index(grid, times)
    states = trajectory[near, torch.arange(len(near), device=near.device)]
    return step_off_grid(teacher, states, grid[near], times, method, labels)


@torch.no_grad()
def consistency_states(trajectory: Tensor, grid: Tensor, times: TimeDraw, *,
                       teacher: Velocity | None = None, method: str = "heun",
                       labels: Tensor | None = None, need_s: bool = True
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """(x_t, t, x_u, u, x_s, s) for the draw's t = tau_i < u = tau_(i+k) <= s = tau_j: the teacher's
    states picked from its trajectory [N + 1, B, ...], or, for jittered times, carried by one
    `method` step from the grid state to the moved time (u and s share one where i + k = j).
    `need_s=False`: the objective reads s but not x_s (None), so no teacher step is paid for it."""
    i, k, j = (v.to(trajectory.device) for v in (times.i, times.k, times.j))
    t, u, s = grid[i], grid[i + k], grid[j]
    x_t, x_u, x_s = pick(trajectory, i), pick(trajectory, i + k), pick(trajectory, j)
    if times.jitter is None:
        return x_t, t, x_u, u, x_s if need_s else None, s
    if teacher is None:
        raise ValueError("jittered consistency times need the teacher to step off the grid")
    where = times.jitter.to(trajectory.device)
    t_new, u_new = cell_time(grid, i, where[0]), cell_time(grid, i + k, where[1])
    s_new = torch.where(i + k == j, u_new, cell_time(grid, j, where[2]))
    x_t = step_off_grid(teacher, x_t, t, t_new, method, labels)
    x_u = step_off_grid(teacher, x_u, u, u_new, method, labels)
    x_s = step_off_grid(teacher, x_s, s, s_new, method, labels) if need_s else None
    return x_t, t_new, x_u, u_new, x_s, s_new


def row_index(mask: Tensor, device: torch.device) -> Tensor:
    """The indices [M] of a [B] mask's true rows, on `device`."""
    return torch.nonzero(mask).squeeze(1).to(device)


@dataclass
class Batch:
    """One step's inputs to an objective: the networks, the noise and its teacher trajectory,
    the time draw, and the data when the objective reads it. [B, ...] / [B]."""

    student: nn.Module             # the trained weights (possibly wrapped for data parallelism)
    online: nn.Module              # the same weights, unwrapped: stop-gradient jumps use it
    target: nn.Module              # G^-: the target EMA, frozen
    teacher: Velocity              # v(x, t) with the batch's labels bound
    noise: Tensor
    grid: Tensor                   # [N + 1] the teacher's grid, increasing, ending at 1
    times: TimeDraw
    trajectory: Tensor | None = None  # [N + 1, B, ...] the teacher from this noise (None: solve it)
    data: Tensor | None = None
    labels: Tensor | None = None
    last_layer: Tensor | None = None  # the weight an adaptive weighting reads
    grad_mean: Callable[[Tensor], Tensor] | None = None  # the mean over data-parallel processes
    step: int = 0                  # the optimizer step this batch trains (for schedules)

    def teacher_trajectory(self, method: str) -> Tensor:
        """The cached trajectory, or the teacher solved on the grid from this noise now."""
        if self.trajectory is None:
            self.trajectory = trajectory_from_noise(self.teacher, self.noise, self.grid, method)
        return self.trajectory


def mean_square(a: Tensor, b: Tensor) -> Tensor:
    """The batch mean of the per-sample mean squared error (a scalar)."""
    return ((a - b) ** 2).flatten(1).mean(1).mean()
