"""Distances between point clouds, for toy distributions whose true samples are free."""

from __future__ import annotations

import torch
from torch import Tensor


def sliced_wasserstein(a: Tensor, b: Tensor, *, projections: int = 1000,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between equal-size clouds a, b [n, d].

    Each random unit direction reduces the problem to 1-D, where optimal transport pairs the
    sorted projections; the result is sqrt of the mean squared gap over directions.
    """
    if a.shape != b.shape:
        raise ValueError(f"point clouds must have equal shapes, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    dirs = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = torch.sort(a.double() @ dirs, dim=0).values
    pb = torch.sort(b.double() @ dirs, dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mmd_rbf(a: Tensor, b: Tensor, *, bandwidths: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)) -> float:
    """Unbiased squared MMD with a sum of Gaussian kernels, between clouds a [n, d], b [m, d]."""
    a, b = a.double(), b.double()

    def kernel_mean(x: Tensor, y: Tensor, same: bool) -> Tensor:
        d2 = torch.cdist(x, y).pow(2)
        k = sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)
        if same:
            n = x.shape[0]
            return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
        return k.mean()

    return float(kernel_mean(a, a, True) + kernel_mean(b, b, True) - 2 * kernel_mean(a, b, False))
