"""Lagrangian flow-map distillation (Boffi et al., 2025, "lagrangian"; METHOD.md).

    L_lag = || dG(x_r, r, s)/ds - sg[ v(G(x_r, r, s), s) ] ||^2,   r <= s

The jump's end must move with the teacher's velocity at the point it lands on: the flow map's
Lagrangian equation. With G(x, r, r) = x built into the student, it defines G alone. x_r is the
teacher's state at r (one step from its nearest grid state); r ~ U[tau_0, 1], s ~ U[r, 1], and a
fraction `diagonal` of the rows take s = r, where the condition reads u(x_r, r, r) = v(x_r, r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from traflow_cli.objectives.shared import (
    Batch,
    ObjectiveLoss,
    jump_and_derivative,
    mean_square,
    teacher_state_at,
)


@dataclass(frozen=True)
class LagrangianConfig:
    """The Lagrangian objective's choices; `distill.lagrangian` holds the ones a user sets."""

    diagonal: float = 0.75         # rows with s = r (read by the time draw)
    teacher_solver: str = "heun"   # solves the cached trajectory, and reaches x_r from it
    derivative: str = "jvp"        # dG/ds by forward mode or a central difference ("fd")
    fd_step: float = 1e-4


def pair_times(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, s) [B] on the batch's device: the draw's (r, s_vel), with s = r on diagonal rows."""
    device = batch.noise.device
    r, s = batch.times.r.to(device), batch.times.s_vel.to(device)
    if batch.times.diagonal is not None:
        s = torch.where(batch.times.diagonal.to(device), r, s)
    return r, s


def loss(batch: Batch, config: LagrangianConfig) -> ObjectiveLoss:
    """L_lag on one step's batch."""
    r, s = pair_times(batch)
    x_r = teacher_state_at(batch.teacher, batch.teacher_trajectory(config.teacher_solver),
                           batch.grid, r, config.teacher_solver, batch.labels)
    landing, d_ds = jump_and_derivative(batch.student, x_r, r, s, batch.labels,
                                        method=config.derivative, fd_step=config.fd_step)
    with torch.no_grad():
        aim = batch.teacher(landing.detach(), s)
    lag = mean_square(d_ds, aim)
    return ObjectiveLoss(total=lag, terms={"lag": lag.detach()})
