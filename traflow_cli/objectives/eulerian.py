"""Eulerian flow-map distillation: MeanFlow's identity with the teacher's velocity (Geng et al.,
2025; Boffi et al., 2025, "eulerian"; METHOD.md).

    u(x_r, r, s) = sg[ v(x_r, r) + (s - r) (d/dr) u(x_r, r, s) ],
    (d/dr) u = grad_x u . v(x_r, r) + du/dr     (the derivative along the teacher's flow)

It follows from (s - r) u(x_r, r, s) = integral from r to s of v along the flow, differentiated
in r. The total derivative is one forward-mode pass with tangent (v, 1, 0) in (x, r, s), or a
central difference along it ("fd"). x_r is the teacher's state at r; r, s and the diagonal
rows (s = r, where the target is v itself) are drawn as the Lagrangian objective's. MeanFlow's
adaptive weight sg[1 / (||err||^2 + c)^p] on each row's sum of squares scales each row's loss
to about 1 (p = 1; p = 0 is the plain squared error).

Tangent warm-up (sCM, Lu & Song 2025; Align Your Flow, Sabour et al. 2025): the target's
second term is scaled by w = min(1, step / tangent_warmup), so training starts as flow matching
on the teacher (target v) and the self-referential d/dr u, noisy while u is far from a flow map,
enters gradually.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from traflow_cli.flow import per_sample
from traflow_cli.objectives.lagrangian import pair_times
from traflow_cli.objectives.shared import (
    Batch,
    ObjectiveLoss,
    call_net,
    repeat_labels,
    teacher_state_at,
)


@dataclass(frozen=True)
class EulerianConfig:
    """The Eulerian objective's choices; `distill.eulerian` holds the ones a user sets."""

    diagonal: float = 0.75         # rows with s = r (read by the time draw); MeanFlow's 75%
    adaptive_p: float = 1.0        # MeanFlow's adaptive loss weight's power
    adaptive_c: float = 1e-3
    tangent_warmup: int = 0        # steps over which the d/dr u term ramps in (0: from the start)
    teacher_solver: str = "heun"
    derivative: str = "jvp"        # the total derivative by forward mode or "fd"
    fd_step: float = 1e-4


def velocity_and_total_derivative(batch: Batch, x: Tensor, r: Tensor, s: Tensor, v: Tensor,
                                  config: EulerianConfig) -> tuple[Tensor, Tensor]:
    """(u(x, r, s), its derivative along (v, 1, 0)); u keeps its gradient, the derivative's is
    cut by the caller's stop-gradient."""
    net, labels = batch.student, batch.labels
    if config.derivative == "jvp":
        return torch.func.jvp(lambda x_, r_: call_net(net, x_, r_, s, labels),
                              (x, r), (v, torch.ones_like(r)))
    # r +- h rounds in the times' dtype: x moves by the steps r really took, and the difference
    # is divided by their sum, so the direction stays (v, 1, 0).
    ahead_r, behind_r = r + config.fd_step, r - config.fd_step
    ahead_h, behind_h = per_sample(ahead_r - r, x), per_sample(r - behind_r, x)
    u = call_net(net, x, r, s, labels)
    with torch.no_grad():
        ahead, behind = call_net(net, torch.cat([x + ahead_h * v, x - behind_h * v]),
                                 torch.cat([ahead_r, behind_r]), torch.cat([s, s]),
                                 repeat_labels(labels)).chunk(2)
    return u, (ahead - behind) / (ahead_h + behind_h)


def loss(batch: Batch, config: EulerianConfig) -> ObjectiveLoss:
    """The adaptively weighted Eulerian loss on one step's batch."""
    r, s = pair_times(batch)
    x_r = teacher_state_at(batch.teacher, batch.teacher_trajectory(config.teacher_solver),
                           batch.grid, r, config.teacher_solver, batch.labels)
    with torch.no_grad():
        v = batch.teacher(x_r, r)
    u, du_dr = velocity_and_total_derivative(batch, x_r, r, s, v, config)
    ramp = min(1.0, batch.step / config.tangent_warmup) if config.tangent_warmup > 0 else 1.0
    aim = (v + ramp * per_sample(s - r, v) * du_dr).detach()
    squares = ((u - aim) ** 2).flatten(1)
    weight = (squares.sum(1).detach() + config.adaptive_c) ** -config.adaptive_p
    total = (weight * squares.sum(1)).mean()
    return ObjectiveLoss(total=total, terms={"eul": squares.mean(1).mean().detach()})
