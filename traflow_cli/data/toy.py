"""2-D target distributions with known structure, sampled exactly (no dataset files)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def checkerboard(n: int, generator: torch.Generator) -> Tensor:
    """Uniform on the 8 dark squares of a 4x4 board covering [-2, 2]^2, [n, 2]."""
    dev = generator.device
    x = 4 * torch.rand(n, generator=generator, device=dev) - 2
    row = torch.randint(0, 2, (n,), generator=generator, device=dev) * 2 - 2  # -2 or 0
    y = torch.rand(n, generator=generator, device=dev) + row + torch.floor(x).remainder(2)
    return torch.stack([x, y], dim=1)


def ring8(n: int, generator: torch.Generator, radius: float = 2.0, std: float = 0.2) -> Tensor:
    """Eight Gaussians (std 0.2) evenly spaced on a circle of radius 2, [n, 2]."""
    dev = generator.device
    k = torch.randint(0, 8, (n,), generator=generator, device=dev).float()
    angle = 2 * math.pi * k / 8
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + std * torch.randn(n, 2, generator=generator, device=dev)


TOY_DISTRIBUTIONS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "checkerboard": checkerboard,
    "ring8": ring8,
}


def sample_toy(name: str, n: int, generator: torch.Generator) -> Tensor:
    """n exact samples [n, 2] of the named toy distribution."""
    try:
        return TOY_DISTRIBUTIONS[name](n, generator)
    except KeyError:
        raise ValueError(f"unknown toy distribution {name!r}; "
                         f"choose from {sorted(TOY_DISTRIBUTIONS)}") from None
