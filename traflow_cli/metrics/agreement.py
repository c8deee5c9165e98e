"""Teacher-student agreement and straightness: signals that need no data or Inception weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from traflow_cli.flow import per_sample
from traflow_cli.objectives.shared import jump, jump_derivative


def mse_psnr(x: Tensor, reference: Tensor) -> tuple[float, float]:
    """Mean squared error and PSNR (dB) for images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((x.double() - reference.double()) ** 2).mean())
    psnr = 10 * math.log10(4.0 / mse) if mse > 0 else math.inf
    return mse, psnr


def straightness(net: nn.Module, noise: Tensor, generator: torch.Generator,
                 labels: Tensor | None = None) -> float:
    """Mean ||dG/ds - (G(x, t, 1) - x) / (1 - t)||^2 over random 0 <= t <= s < 1 (METHOD.md).

    x is the student's own state at t (one jump from noise); zero for a straight trajectory.
    """
    b = noise.shape[0]
    t = 0.9 * torch.rand(b, generator=generator).to(noise.device)
    s = t + (0.99 - t) * torch.rand(b, generator=generator).to(noise.device)
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    with torch.no_grad():
        x = jump(net, noise, zeros, t, labels)
        chord = (jump(net, x, t, ones, labels) - x) / per_sample(1 - t, x)
    with torch.enable_grad():
        derivative = jump_derivative(net, x, t, s, labels).detach()
    return float(((derivative - chord) ** 2).flatten(1).mean(1).mean())
