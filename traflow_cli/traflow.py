"""TraFlow trajectory distillation: the objective of ../shared/METHOD.md, in plain PyTorch.

Notation follows METHOD.md: t = 0 is noise, t = 1 is data; the student jumps with
G(x_t, t, s) = x_t + (s - t) * u(x_t, t, s); G^- is the student with its target-EMA weights;
Phi is the teacher's ODE solve on the grid tau_0 = 0 < ... < tau_N = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from traflow_cli.flow import (
    Velocity,
    interpolate,
    per_sample,
    pick,
    sample_train_times,
    solve_on_grid,
    target_velocity,
    time_grid,
    trajectory_on_grid,
)


@dataclass(frozen=True)
class TraFlowConfig:
    """Every choice of the objective; each is a spec field (METHOD.md marks ours)."""

    grid_steps: int = 18              # N of the teacher grid
    teacher_solver: str = "heun"      # Phi: "heun" or "euler" on the grid
    start: str = "teacher"            # x_t = Phi(noise, 0 -> t) ("teacher") or the data path
    w_out: float = 1.0                # output reconstruction
    w_vel: float = 1.0                # velocity (straightness) on the teacher's chord
    w_sc: float = 1.0                 # self-consistency
    w_fm: float = 0.0                 # optional flow-matching anchor with real data
    lambda_vel: float | None = None   # None: adaptive gradient-norm ratio
    lambda_clip: tuple[float, float] = (0.01, 10.0)
    distance: str = "l2"              # "l2" or "pseudo_huber"
    huber_c: float = 0.03
    derivative: str = "jvp"           # dG/ds by forward-mode AD ("jvp") or central difference ("fd")
    fd_step: float = 1e-3


@dataclass
class TraFlowLoss:
    """The scalar to minimise and each term, detached, for logging."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


def call_net(net: nn.Module, x: Tensor, t: Tensor, s: Tensor | None = None,
             labels: Tensor | None = None) -> Tensor:
    """net(x, t[, s]) with class labels passed only to conditional networks."""
    args = (x, t) if s is None else (x, t, s)
    return net(*args) if labels is None else net(*args, class_labels=labels)


def jump(net: nn.Module, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None = None) -> Tensor:
    """G(x, t, s) = x + (s - t) * u(x, t, s); x [B, ...], t, s [B]. G(x, t, t) = x exactly."""
    return x + per_sample(s - t, x) * call_net(net, x, t, s, labels)


def jump_derivative(net: nn.Module, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None = None,
                    *, method: str = "jvp", fd_step: float = 1e-3) -> Tensor:
    """dG(x, t, s)/ds = u + (s - t) du/ds, image-shaped [B, ...] (METHOD.md, target 2)."""
    if method == "jvp":
        # Forward mode, tangent 1 on s: one pass gives the per-sample derivative, and the result
        # stays differentiable with respect to the network's weights.
        def along_s(s_: Tensor) -> Tensor:
            return jump(net, x, t, s_, labels)

        _, derivative = torch.func.jvp(along_s, (s,), (torch.ones_like(s),))
        return derivative
    if method == "fd":
        ahead = jump(net, x, t, s + fd_step, labels)
        behind = jump(net, x, t, s - fd_step, labels)
        return (ahead - behind) / (2 * fd_step)
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

    def rows(self, index: slice | Tensor) -> TimeDraw:
        """The draw for a subset of the batch (a rank's share under DDP)."""
        return TimeDraw(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})


def draw_times(config: TraFlowConfig, batch: int, generator: torch.Generator) -> TimeDraw:
    """Draw every time of a TraFlow loss for a batch from one generator."""
    i, k, j = sample_grid_indices(config.grid_steps, batch, generator)
    dev = generator.device
    r = torch.rand(batch, generator=generator, device=dev)
    s_vel = r + (1 - r) * torch.rand(batch, generator=generator, device=dev)
    t_fm = sample_train_times(batch, generator, dev)
    return TimeDraw(i=i, k=k, j=j, r=r, s_vel=s_vel, t_fm=t_fm)


def distance(a: Tensor, b: Tensor, kind: str = "l2", huber_c: float = 0.03) -> Tensor:
    """Per-sample distance [B]: mean squared error, or pseudo-Huber sqrt(mse + c^2) - c."""
    mse = ((a - b) ** 2).flatten(1).mean(1)
    if kind == "l2":
        return mse
    if kind == "pseudo_huber":
        return torch.sqrt(mse + huber_c**2) - huber_c
    raise ValueError(f"distance must be 'l2' or 'pseudo_huber', got {kind!r}")


def adaptive_lambda(consistency: Tensor, velocity_loss: Tensor, last_layer: Tensor,
                    clip: tuple[float, float], grad_mean: Callable[[Tensor], Tensor] | None = None
                    ) -> Tensor:
    """||grad consistency|| / ||grad L_vel|| on the last layer's weight, clipped (SCoT's weighting).

    Under data parallelism each process sees part of the batch: `grad_mean` averages the two
    gradients over processes before the norms, so lambda is the whole batch's on every process.
    """
    g_cons = torch.autograd.grad(consistency, last_layer, retain_graph=True)[0]
    g_vel = torch.autograd.grad(velocity_loss, last_layer, retain_graph=True)[0]
    if grad_mean is not None:
        g_cons, g_vel = grad_mean(torch.stack([g_cons, g_vel])).unbind()
    return (g_cons.norm() / (g_vel.norm() + 1e-8)).clamp(*clip).detach()


def traflow_loss(student: nn.Module, target: nn.Module, teacher: Velocity, noise: Tensor, *,
                 config: TraFlowConfig, times: TimeDraw, data: Tensor | None = None,
                 labels: Tensor | None = None, last_layer: Tensor | None = None,
                 trajectory: Tensor | None = None,
                 grad_mean: Callable[[Tensor], Tensor] | None = None) -> TraFlowLoss:
    """One TraFlow loss on a batch of noise [B, ...] (and data, for start="data" or w_fm > 0).

    `teacher(x, t)` is the teacher velocity (labels already bound); `target` is G^-'s network,
    whose weights must not require grad; `last_layer` is the student weight used to balance
    L_vel when config.lambda_vel is None; `trajectory` [N + 1, B, ...] is the teacher's solve
    from this noise on the grid, when it was cached, so that it is not paid again; `grad_mean`
    averages over data-parallel processes (see adaptive_lambda).
    """
    cfg = config
    grid = time_grid(cfg.grid_steps, device=noise.device)
    i, k, j = times.i.to(noise.device), times.k.to(noise.device), times.j.to(noise.device)
    t, u, s = grid[i], grid[i + k], grid[j]
    ones = torch.ones_like(t)
    terms: dict[str, Tensor] = {}
    total = noise.new_zeros(())

    # One teacher trajectory per sample serves x_t, Phi(x_t, t -> u), Phi(x_t, t -> s) and,
    # when it starts from noise, x_hat = Phi(noise, 0 -> 1) for L_vel.
    with torch.no_grad():
        if trajectory is not None:
            traj, x_hat = trajectory, trajectory[-1]
        elif cfg.start == "teacher":
            traj = trajectory_on_grid(teacher, noise, torch.zeros_like(i), grid,
                                      method=cfg.teacher_solver)
            x_hat = traj[-1]
        else:
            if data is None:
                raise ValueError("start='data' needs a data batch")
            traj = trajectory_on_grid(teacher, interpolate(noise, data, t), i, grid,
                                      method=cfg.teacher_solver)
            x_hat = (solve_on_grid(teacher, noise, grid, method=cfg.teacher_solver)
                     if cfg.w_vel > 0 else None)
        x_t, x_u, x_s = pick(traj, i), pick(traj, i + k), pick(traj, j)

    if cfg.w_out > 0 or cfg.w_sc > 0:
        # Both targets are carried to the data end by G^-, in one batched no-grad call:
        # out: G^-(Phi(x_t, t->s), s, 1);  sc: G^-(G^-(Phi(x_t, t->u), u, s), s, 1).
        with torch.no_grad():
            x_via_u = jump(target, x_u, u, s, labels)
            both = jump(target, torch.cat([x_s, x_via_u]), torch.cat([s, s]),
                        torch.cat([ones, ones]), _repeat(labels))
            end_out, end_sc = both.chunk(2)
        # The gradient flows through the inner G only; G^-'s weights are frozen.
        student_end = jump(target, jump(student, x_t, t, s, labels), s, ones, labels)
        consistency = noise.new_zeros(())
        if cfg.w_out > 0:
            terms["out"] = distance(student_end, end_out, cfg.distance, cfg.huber_c).mean()
            consistency = consistency + cfg.w_out * terms["out"]
        if cfg.w_sc > 0:
            terms["sc"] = distance(student_end, end_sc, cfg.distance, cfg.huber_c).mean()
            consistency = consistency + cfg.w_sc * terms["sc"]
        total = total + consistency
    else:
        consistency = None

    if cfg.w_vel > 0:
        # Chord x_r = r x_hat + (1 - r) noise, r <= s: a straight teacher jumps at speed x_hat - noise.
        r, s_vel = times.r.to(noise.device), times.s_vel.to(noise.device)
        x_r = interpolate(noise, x_hat, r)
        d_jump = jump_derivative(student, x_r, r, s_vel, labels, method=cfg.derivative,
                                 fd_step=cfg.fd_step)
        terms["vel"] = ((d_jump - target_velocity(noise, x_hat)) ** 2).flatten(1).mean(1).mean()
        if cfg.lambda_vel is not None:
            lam = torch.tensor(cfg.lambda_vel, device=noise.device)
        elif consistency is not None and last_layer is not None and consistency.requires_grad:
            lam = adaptive_lambda(consistency, terms["vel"], last_layer, cfg.lambda_clip,
                                  grad_mean)
        else:
            lam = torch.ones((), device=noise.device)
        terms["lambda_vel"] = lam
        total = total + cfg.w_vel * lam * terms["vel"]

    if cfg.w_fm > 0:
        if data is None:
            raise ValueError("w_fm > 0 needs a data batch")
        t_fm = times.t_fm.to(noise.device)
        x_fm = interpolate(noise, data, t_fm)
        pred = call_net(student, x_fm, t_fm, t_fm, labels)  # u(x_t, t, t): instantaneous velocity
        terms["fm"] = ((pred - target_velocity(noise, data)) ** 2).flatten(1).mean(1).mean()
        total = total + cfg.w_fm * terms["fm"]

    return TraFlowLoss(total=total, terms={name: v.detach() for name, v in terms.items()})


def _repeat(labels: Tensor | None) -> Tensor | None:
    return None if labels is None else torch.cat([labels, labels])
