"""Exponential moving averages of a module's weights, kept in float32."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(module: nn.Module) -> nn.Module:
    """A frozen float32 copy of `module` to hold the average (used in eval mode)."""
    ema = copy.deepcopy(module).float().eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, source: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * source, parameters and floating buffers alike."""
    ema_params = list(ema.parameters())
    src_params = [p.detach().float() for p in source.parameters()]
    if decay == 0.0:
        torch._foreach_copy_(ema_params, src_params)
    else:
        torch._foreach_lerp_(ema_params, src_params, 1.0 - decay)
    for b_ema, b_src in zip(ema.buffers(), source.buffers(), strict=True):
        b_ema.copy_(b_src)
