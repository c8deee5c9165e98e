"""Consistency trajectory distillation, without the GAN term (Kim et al., 2024; METHOD.md, "ctm").

    L_ctm = d( G^-(G(x_t, t, s), s, 1),  G^-( sg[G(Phi(x_t, t -> u), u, s)], s, 1) )
    L_dsm = || u(x_tau, tau, tau) - (data - noise) ||^2,  x_tau = (1 - tau) noise + tau data

t < u <= s are grid times drawn as TraFlow's are (CTM's P(k) ~ k); Phi is the teacher's solve
on its grid. The target's inner jump is taken by the online weights under stop-gradient, as
CTM's code does, and both ends are carried to the data end by the target EMA G^-. L_dsm, CTM's
denoising anchor on real data, is rectified flow's velocity loss on the diagonal s = t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from traflow_cli.flow import interpolate, target_velocity
from traflow_cli.objectives.shared import (
    Batch,
    ObjectiveLoss,
    call_net,
    consistency_states,
    distance,
    jump,
    jump_rows,
    mean_square,
    row_index,
)


@dataclass(frozen=True)
class CTMConfig:
    """CTM's choices; the spec's `distill.ctm` section holds the ones a user sets."""

    w_dsm: float = 1.0           # the denoising anchor's weight (0: data-free)
    teacher_solver: str = "heun"  # Phi's stepper on the grid
    distance: str = "l2"
    huber_c: float = 0.03


def loss(batch: Batch, config: CTMConfig) -> ObjectiveLoss:
    """L_ctm + w_dsm L_dsm on one step's batch."""
    trajectory = batch.teacher_trajectory(config.teacher_solver)
    # CTM's target starts from x_u alone: no teacher step to x_s (two evaluations a row).
    x_t, t, x_u, u, _, s = consistency_states(trajectory, batch.grid, batch.times,
                                              teacher=batch.teacher, method=config.teacher_solver,
                                              labels=batch.labels, need_s=False)
    ones, device, labels = torch.ones_like(t), batch.noise.device, batch.labels
    # G(., a, a) is the identity: rows with u = s or s = 1 skip the network (which rows is read
    # on the host: one sync per step).
    i, k, j = torch.stack([batch.times.i, batch.times.k, batch.times.j]).cpu()
    via_u, to_end = row_index(i + k < j, device), row_index(j < len(batch.grid) - 1, device)
    with torch.no_grad():
        inner = jump_rows(batch.online, x_u, u, s, labels, via_u)
        aim = jump_rows(batch.target, inner, s, ones, labels, to_end)
    student_end = jump_rows(batch.target, jump(batch.student, x_t, t, s, labels), s, ones,
                            labels, to_end)
    terms = {"ctm": distance(student_end, aim, config.distance, config.huber_c).mean()}
    total = terms["ctm"]
    if config.w_dsm > 0:
        if batch.data is None:
            raise ValueError("CTM's w_dsm > 0 needs a data batch")
        tau = batch.times.t_fm.to(device)
        velocity = call_net(batch.student, interpolate(batch.noise, batch.data, tau), tau, tau,
                            labels)
        terms["dsm"] = mean_square(velocity, target_velocity(batch.noise, batch.data))
        total = total + config.w_dsm * terms["dsm"]
    return ObjectiveLoss(total=total, terms={name: v.detach() for name, v in terms.items()})
