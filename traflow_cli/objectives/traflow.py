"""TraFlow trajectory distillation (METHOD.md, "The three targets"), in plain PyTorch.

    L = w_out L_out + w_sc L_sc + w_vel lambda L_vel (+ w_fm L_fm)
    L_out = d(G^-(G(x_t, t, s), s, 1), G^-(Phi(x_t, t -> s), s, 1))          output
    L_sc  = d(G^-(G(x_t, t, s), s, 1), G^-(G^-(Phi(x_t, t -> u), u, s), s, 1))  self-consistency
    L_vel = || dG(x_r, r, s)/ds - (x_hat - noise) ||^2, x_r on the chord       velocity

One loss call has two sides, as METHOD.md's "Cost per step" splits it:
- without gradient: the teacher's trajectory (`solve_teacher`, or a cached one) and, from it,
  the targets (`traflow_targets`: x_t, the G^- ends of L_out and L_sc, the chord of L_vel);
- with gradient: the student's terms against those targets (`student_terms`).
Notation and the shared pieces (the jump G, the time draw, the teacher's states): shared.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from traflow_cli.flow import Velocity, interpolate, solve_on_grid, target_velocity, trajectory_on_grid
from traflow_cli.objectives.shared import (
    Batch,
    ObjectiveLoss,
    TimeDraw,
    call_net,
    consistency_states,
    distance,
    jump,
    jump_and_derivative,
    jump_rows,
    repeat_labels,
    row_index,
    start_state,
    teacher_state_at,
    trajectory_from_noise,
)

# The name TraFlow's callers have always used for its loss.
TraFlowLoss = ObjectiveLoss


@dataclass(frozen=True)
class TraFlowConfig:
    """Every choice of the objective (METHOD.md marks ours). The spec has a field of the same
    name and default for each: the engine's (teacher_solver, start, ...) in `distill`, the
    weights and TraFlow's own choices in `distill.traflow`; the job builds this from them."""

    teacher_solver: str = "heun"      # Phi's stepper on the grid, by name (flow.trajectory_on_grid)
    start: str = "teacher"            # x_t = Phi(noise, 0 -> t) ("teacher") or the data path
    w_out: float = 1.0                # output reconstruction
    w_vel: float = 1.0                # velocity (straightness) on the teacher's chord
    w_sc: float = 1.0                 # self-consistency
    w_fm: float = 0.0                 # optional flow-matching anchor with real data
    lambda_vel: float | str = "adaptive"  # "adaptive": the clipped gradient-norm ratio; or fixed
    lambda_clip: tuple[float, float] = (0.01, 10.0)
    distance: str = "l2"              # "l2" or "pseudo_huber"
    # pseudo-Huber's c on the per-pixel mean: iCT's 0.00054 sqrt(d) on the sum is 0.00054 here.
    huber_c: float = 0.03
    derivative: str = "jvp"           # dG/ds by forward-mode AD ("jvp") or central difference ("fd")
    # The s features turn at up to 999 rad per unit time: at 1e-3 the difference is off by 0.7-2%
    # on trained shapes32 students, at 1e-4 by 0.07% (float32 rounding sets the floor below;
    # benchmarks/fd_accuracy.py).
    fd_step: float = 1e-4
    # A speed option that changes the estimator (measured in docs/PERFORMANCE.md):
    vel_every: int = 1                # L_vel on every vel_every-th row of the batch (1: all rows)
    # Where the consistency terms' times t < u <= s lie: on the grid points ("grid", CTM's
    # discrete draw), or each interior grid point moved uniformly within its cell ("jittered":
    # the same index draw, continuous times; the teacher reaches them by one step from the grid
    # state), so the student cannot learn each grid time on its own.
    consistency_times: str = "grid"
    # L_vel's target for dG(x, r, s)/ds: the chord x_hat - noise ("chord", TraFlow), or the
    # teacher's velocity at the student's landing point, v(G(x_r, r, s), s), with x_r on the
    # teacher's trajectory ("tangent": the Lagrangian condition, METHOD.md).
    vel_target: str = "chord"
    # L_sc's inner jump G(Phi(x_t, t -> u), u, s): by G^- ("target") or by the online weights
    # under stop-gradient ("online", as CTM's code does); the carry to the data end stays G^-.
    sc_inner: str = "target"


def _with_jump_gradient(value: Tensor, student_jump: Tensor, jump_grad: Tensor) -> Tensor:
    """A scalar equal to `value` whose gradient is jump_grad pulled back through G(x_t, t, s):
    <G, g> - sg[<G, g>] adds 0 to the value and g dG/dweights to the gradient."""
    inner = (student_jump * jump_grad).sum()
    return value.detach() + (inner - inner.detach())


def adaptive_lambda(consistency: Tensor, student_jump: Tensor, velocity_loss: Tensor,
                    last_layer: Tensor, clip: tuple[float, float],
                    grad_mean: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """||grad consistency|| / ||grad L_vel|| on the last layer's weight, clipped (SCoT's weighting).

    The consistency terms reach the weights only through the student's jump G(x_t, t, s)
    (`student_jump`): their gradient there is taken once, freeing G^-'s graph, and returned with
    lambda, so that the step's backward continues from it (TraFlowLoss.backward) instead of
    differentiating through G^- a second time. Under data parallelism each process sees part of
    the batch: `grad_mean` averages the two last-layer gradients over processes before the
    norms, so lambda is the whole batch's on every process.
    """
    (jump_grad,) = torch.autograd.grad(consistency, student_jump)
    g_cons = torch.autograd.grad(student_jump, last_layer, jump_grad, retain_graph=True)[0]
    g_vel = torch.autograd.grad(velocity_loss, last_layer, retain_graph=True)[0]
    if grad_mean is not None:
        g_cons, g_vel = grad_mean(torch.stack([g_cons, g_vel])).unbind()
    return (g_cons.norm() / (g_vel.norm() + 1e-8)).clamp(*clip).detach(), jump_grad


@dataclass
class TeacherSolve:
    """The teacher's part of a batch, the only part a trajectory cache can hold (no gradient).

    trajectory [N + 1, B, ...]: the teacher's states on the grid (from noise for start="teacher",
    from each sample's x_t onwards for start="data"); x_hat [B, ...]: Phi(noise, grid[0] -> 1),
    the chord's end for L_vel (None when L_vel is off and the trajectory does not end there).
    """

    trajectory: Tensor
    x_hat: Tensor | None

    @classmethod
    def cached(cls, trajectory: Tensor) -> TeacherSolve:
        """A solve read from a cache of trajectories that start at noise."""
        return cls(trajectory=trajectory, x_hat=trajectory[-1])


@torch.no_grad()
def solve_teacher(teacher: Velocity, noise: Tensor, grid: Tensor, times: TimeDraw, *,
                  config: TraFlowConfig, data: Tensor | None = None) -> TeacherSolve:
    """Phi on the grid for a batch of noise [B, ...] (METHOD.md, "The three targets").

    One trajectory per sample serves x_t, Phi(x_t, t -> u), Phi(x_t, t -> s) and, when it starts
    from noise, x_hat = Phi(noise, grid[0] -> 1). The stepper is config.teacher_solver, by name.
    """
    method = config.teacher_solver
    if config.start == "teacher":
        trajectory = trajectory_from_noise(teacher, noise, grid, method)
        return TeacherSolve(trajectory=trajectory, x_hat=trajectory[-1])
    if data is None:
        raise ValueError("start='data' needs a data batch")
    i = times.i.to(noise.device)
    trajectory = trajectory_on_grid(teacher, interpolate(noise, data, grid[i]), i, grid,
                                    method=method)
    x_hat = (solve_on_grid(teacher, start_state(noise, grid[0]), grid, method=method)
             if config.w_vel > 0 else None)
    return TeacherSolve(trajectory=trajectory, x_hat=x_hat)


@dataclass
class Targets:
    """The no-grad side of one loss call: the student terms' inputs and what they must match.

    Consistency rows: the student jumps x_t from t to s; `end_out` = G^-(Phi(x_t, t -> s), s, 1)
    and `end_sc` = G^-(G^-(Phi(x_t, t -> u), u, s), s, 1) are the targets at the data end.
    Velocity rows (all rows, or every vel_every-th): dG(x_r, r, s_vel)/ds must match
    `chord_velocity` = x_hat - noise.
    Anchor rows: u(x_fm, t_fm, t_fm) must match `fm_velocity` = data - noise. [B, ...] / [B].
    """

    x_t: Tensor
    t: Tensor
    s: Tensor
    end_out: Tensor | None = None
    end_sc: Tensor | None = None
    x_r: Tensor | None = None
    r: Tensor | None = None
    s_vel: Tensor | None = None
    chord_velocity: Tensor | None = None
    x_fm: Tensor | None = None
    t_fm: Tensor | None = None
    fm_velocity: Tensor | None = None
    labels: Tensor | None = None
    vel_labels: Tensor | None = None  # the velocity rows' classes
    end_rows: Tensor | None = None  # [M] rows with s < 1: the others' G^-(., s, 1) is the identity


@torch.no_grad()
def traflow_targets(target: nn.Module, solve: TeacherSolve, noise: Tensor, grid: Tensor,
                    times: TimeDraw, *, config: TraFlowConfig, data: Tensor | None = None,
                    labels: Tensor | None = None, teacher: Velocity | None = None,
                    online: nn.Module | None = None) -> Targets:
    """Everything of one loss call that needs no gradient: the teacher's states picked from its
    trajectory, the G^- ends of L_out and L_sc, the chord of L_vel, the anchor of L_fm.
    `teacher` steps to times off the grid (consistency_times="jittered", vel_target="tangent");
    `online` is the student's network for sc_inner="online"."""
    cfg = config
    x_t, t, x_u, u, x_s, s = consistency_states(solve.trajectory, grid, times, teacher=teacher,
                                                method=cfg.teacher_solver, labels=labels)
    # G^-(x, a, a) = x: rows that jump nowhere (u = s, or s = 1 for the carry to the data end)
    # skip the network. Which rows is read on the host, once per step.
    i_h, k_h, j_h, vel_h = torch.stack([times.i, times.k, times.j, times.vel.long()]).cpu()
    via_u, to_end = i_h + k_h < j_h, j_h < len(grid) - 1  # [B] u < s, s < 1

    def rows(mask: Tensor) -> Tensor:
        return row_index(mask, noise.device)

    end_rows = rows(to_end)
    out = Targets(x_t=x_t, t=t, s=s, labels=labels, end_rows=end_rows)
    if cfg.w_out > 0 or cfg.w_sc > 0:
        # Both targets are carried to the data end by G^-, in one batched call:
        # out: G^-(Phi(x_t, t->s), s, 1);  sc: G^-(G^-(Phi(x_t, t->u), u, s), s, 1).
        # Where u = s, x_via_u is x_s itself, so the sc end is the out end: carried once.
        ones = torch.ones_like(t)
        if cfg.sc_inner == "online" and online is None:
            raise ValueError("sc_inner='online' needs the student's network (online=...)")
        if cfg.w_sc == 0:  # L_out alone: no inner jump, and one carry instead of two
            out.end_out = jump_rows(target, x_s, s, ones, labels, end_rows)
        else:
            inner = online if cfg.sc_inner == "online" else target
            x_via_u = jump_rows(inner, x_u, u, s, labels, rows(via_u))
            both = jump_rows(target, torch.cat([x_s, x_via_u]), torch.cat([s, s]),
                             torch.cat([ones, ones]), repeat_labels(labels),
                             torch.cat([end_rows, rows(via_u & to_end) + len(x_t)]))
            out.end_out, end_sc = both.chunk(2)
            same = rows(~via_u & to_end)
            out.end_sc = end_sc.index_copy(0, same, out.end_out[same])
    if cfg.w_vel > 0:
        # Chord x_r = r x_hat + (1 - r) noise, r <= s: a straight teacher jumps at speed x_hat - noise.
        if solve.x_hat is None and cfg.vel_target == "chord":
            raise ValueError("w_vel > 0 needs the teacher's output x_hat")
        vel_rows = None if bool(vel_h.all()) else rows(vel_h.bool())

        def take(x: Tensor | None) -> Tensor | None:
            return x if x is None or vel_rows is None else x[vel_rows]

        noise_v, x_hat_v = take(noise), take(solve.x_hat)
        out.r, out.s_vel = take(times.r.to(noise.device)), take(times.s_vel.to(noise.device))
        out.vel_labels = take(labels)
        if cfg.vel_target == "tangent":
            # x_r on the teacher's trajectory: one step from the nearest grid state. The spec
            # keeps every row on L_vel here (vel_every = 1), so the trajectory's rows are these.
            trajectory = solve.trajectory if vel_rows is None else solve.trajectory[:, vel_rows]
            out.x_r = teacher_state_at(teacher, trajectory, grid, out.r, cfg.teacher_solver,
                                       out.vel_labels)
        else:
            out.x_r = interpolate(noise_v, x_hat_v, out.r)
            out.chord_velocity = target_velocity(noise_v, x_hat_v)
    if cfg.w_fm > 0:
        if data is None:
            raise ValueError("w_fm > 0 needs a data batch")
        out.t_fm = times.t_fm.to(noise.device)
        out.x_fm = interpolate(noise, data, out.t_fm)
        out.fm_velocity = target_velocity(noise, data)
    return out


def student_terms(student: nn.Module, target: nn.Module, targets: Targets, *,
                  config: TraFlowConfig, last_layer: Tensor | None = None,
                  grad_mean: Callable[[Tensor], Tensor] | None = None,
                  teacher: Velocity | None = None) -> TraFlowLoss:
    """The terms with gradient, given the no-grad side (METHOD.md, targets 1-3 and L_fm).

    `target` is G^-'s network (weights frozen; the consistency terms differentiate through its
    input); `last_layer` is the student weight that balances L_vel when lambda_vel="adaptive";
    `teacher` gives vel_target="tangent" its target at the student's landing point.
    """
    cfg, tg, labels = config, targets, targets.labels
    terms: dict[str, Tensor] = {}
    total = tg.x_t.new_zeros(())
    consistency = student_jump = jump_grad = None
    if cfg.w_out > 0 or cfg.w_sc > 0:
        ones = torch.ones_like(tg.t)
        # The gradient flows through the inner G only; G^-'s weights are frozen.
        student_jump = jump(student, tg.x_t, tg.t, tg.s, labels)
        student_end = jump_rows(target, student_jump, tg.s, ones, labels, tg.end_rows)
        consistency = tg.x_t.new_zeros(())
        if cfg.w_out > 0:
            terms["out"] = distance(student_end, tg.end_out, cfg.distance, cfg.huber_c).mean()
            consistency = consistency + cfg.w_out * terms["out"]
        if cfg.w_sc > 0:
            terms["sc"] = distance(student_end, tg.end_sc, cfg.distance, cfg.huber_c).mean()
            consistency = consistency + cfg.w_sc * terms["sc"]
        total = total + consistency
    rest = tg.x_t.new_zeros(())  # the total beyond the consistency terms
    if cfg.w_vel > 0:
        landing, d_jump = jump_and_derivative(student, tg.x_r, tg.r, tg.s_vel, tg.vel_labels,
                                              method=cfg.derivative, fd_step=cfg.fd_step)
        if cfg.vel_target == "tangent":  # the end moves with the teacher: sg[v(G, s)]
            if teacher is None:
                raise ValueError("vel_target='tangent' needs the teacher's velocity")
            with torch.no_grad():
                aim = teacher(landing.detach(), tg.s_vel)
        else:  # a straight teacher jumps at the chord's speed x_hat - noise
            aim = tg.chord_velocity
        terms["vel"] = ((d_jump - aim) ** 2).flatten(1).mean(1).mean()
        if cfg.lambda_vel != "adaptive":
            lam = torch.tensor(float(cfg.lambda_vel), device=tg.x_t.device)
        elif consistency is not None and last_layer is not None and consistency.requires_grad:
            lam, jump_grad = adaptive_lambda(consistency, student_jump, terms["vel"], last_layer,
                                             cfg.lambda_clip, grad_mean)
        else:
            lam = torch.ones((), device=tg.x_t.device)
        terms["lambda_vel"] = lam
        rest = rest + cfg.w_vel * lam * terms["vel"]
    if cfg.w_fm > 0:
        pred = call_net(student, tg.x_fm, tg.t_fm, tg.t_fm, labels)  # u(x_t, t, t): velocity
        terms["fm"] = ((pred - tg.fm_velocity) ** 2).flatten(1).mean(1).mean()
        rest = rest + cfg.w_fm * terms["fm"]
    if jump_grad is not None:  # the consistency graph was freed: carry its gradient instead
        total = _with_jump_gradient(total, student_jump, jump_grad)
    return TraFlowLoss(total=total + rest, terms={name: v.detach() for name, v in terms.items()})


def traflow_loss(student: nn.Module, target: nn.Module, teacher: Velocity, noise: Tensor, *,
                 config: TraFlowConfig, grid: Tensor, times: TimeDraw,
                 data: Tensor | None = None, labels: Tensor | None = None,
                 last_layer: Tensor | None = None, trajectory: Tensor | None = None,
                 grad_mean: Callable[[Tensor], Tensor] | None = None,
                 online: nn.Module | None = None) -> TraFlowLoss:
    """One TraFlow loss on a batch of noise [B, ...] (and data, for start="data" or w_fm > 0).

    The teacher's side, then the student's: solve_teacher (skipped when `trajectory`
    [N + 1, B, ...], a cached solve from this noise, is given), traflow_targets, student_terms.
    `teacher(x, t)` is the teacher velocity (labels already bound); `grid` [N + 1] is the
    teacher's time grid (increasing, ending at 1); `grad_mean` averages over data-parallel
    processes (see adaptive_lambda); `online` is the student's plain network (no DDP wrapper)
    for sc_inner="online" (default: `student`).
    """
    online = getattr(student, "module", student) if online is None else online  # no DDP
    solve = (TeacherSolve.cached(trajectory) if trajectory is not None else
             solve_teacher(teacher, noise, grid, times, config=config, data=data))
    targets = traflow_targets(target, solve, noise, grid, times, config=config, data=data,
                              labels=labels, teacher=teacher, online=online)
    return student_terms(student, target, targets, config=config, last_layer=last_layer,
                         grad_mean=grad_mean, teacher=teacher)


def loss(batch: Batch, config: TraFlowConfig) -> ObjectiveLoss:
    """TraFlow's loss on one step's batch (the engine's entry to every objective)."""
    return traflow_loss(batch.student, batch.target, batch.teacher, batch.noise, config=config,
                        grid=batch.grid, times=batch.times, data=batch.data, labels=batch.labels,
                        last_layer=batch.last_layer, trajectory=batch.trajectory,
                        grad_mean=batch.grad_mean, online=batch.online)
