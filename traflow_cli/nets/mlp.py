"""Toy velocity network for 2-D data, with the optional target-time input of the student."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FourierTime(nn.Module):
    """Sinusoidal features of a time in [0, 1], [B] -> [B, dim]."""

    def __init__(self, dim: int, max_period: float = 10_000.0) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        # Scale as the image networks do (999 * t), so low frequencies still resolve [0, 1].
        angles = 999.0 * t[:, None].to(self.freqs.dtype) * self.freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


def _embedding(time_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(FourierTime(time_dim), nn.Linear(time_dim, hidden), nn.SiLU(),
                         nn.Linear(hidden, hidden))


class MLPVelocity(nn.Module):
    """v(x, t) for points x [B, D]; with target_time=True, u(x, t, s) for the TraFlow student.

    The s branch (METHOD.md, "The student") is added to the t embedding before every layer and
    its last linear map starts at zero, so a student loaded from a teacher computes v(x, t).
    """

    # A rectified flow, defined on all of t in [0, 1]; an EDM network (nets/edm.py) has the
    # noise range (sigma_lo, sigma_hi) it is evaluated in. Every network says which it is.
    sigma_range: tuple[float, float] | None = None

    def __init__(self, *, dim: int = 2, hidden: int = 256, depth: int = 3, time_dim: int = 64,
                 target_time: bool = False) -> None:
        super().__init__()
        self.target_time = target_time
        self.t_embed = _embedding(time_dim, hidden)
        if target_time:
            self.s_embed = _embedding(time_dim, hidden)
            nn.init.zeros_(self.s_embed[-1].weight)
            nn.init.zeros_(self.s_embed[-1].bias)
        self.input_layer = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.cond = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.output_layer = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None) -> Tensor:
        """x [B, D], t [B] (and s [B] for a student) -> velocity [B, D]."""
        emb = self.t_embed(t)
        if self.target_time:
            if s is None:
                raise ValueError("this network is a student: pass the target time s")
            emb = emb + self.s_embed(s)
        elif s is not None:
            raise ValueError("this network is a teacher: it takes no target time s")
        emb = nn.functional.silu(emb)
        h = nn.functional.silu(self.input_layer(x) + self.cond[0](emb))
        for layer, cond in zip(self.layers, self.cond[1:], strict=False):
            h = nn.functional.silu(layer(h) + cond(emb))
        return self.output_layer(h)
