"""Layers of NVlabs/edm's networks (``training/networks.py``), our own implementation.

Parameter and buffer names equal EDM's (``weight``, ``bias``, ``resample_filter``, ``freqs``,
``norm0``, ``conv0``, ``affine``, ...), so a state dict read out of an EDM snapshot loads with
``strict=True``. The forward maths follows EDM's layer by layer; initialisation follows its
``init_mode`` / ``init_weight`` / ``init_bias`` conventions, so a network built here from
scratch starts where EDM's would.

Differences on purpose: no custom autograd function in attention (forward-mode AD, which the
TraFlow velocity term uses, must pass through), and no fp16 switch (precision belongs to the
runtime's autocast).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# init settings as EDM passes them: dict(init_mode=..., init_weight=..., init_bias=...)
Init = dict[str, float | str]


@torch.no_grad()
def _init_(tensor: Tensor, mode: str, fan_in: int, fan_out: int, scale: float) -> None:
    """EDM's weight_init in place: the named distribution times `scale`."""
    if mode == "xavier_uniform":
        tensor.uniform_(-1, 1).mul_(math.sqrt(6 / (fan_in + fan_out)) * scale)
    elif mode == "xavier_normal":
        tensor.normal_().mul_(math.sqrt(2 / (fan_in + fan_out)) * scale)
    elif mode == "kaiming_uniform":
        tensor.uniform_(-1, 1).mul_(math.sqrt(3 / fan_in) * scale)
    elif mode == "kaiming_normal":
        tensor.normal_().mul_(math.sqrt(1 / fan_in) * scale)
    else:
        raise ValueError(f"unknown init_mode {mode!r}")


class Linear(nn.Module):
    """x @ weight.T + bias, weight [out, in]; EDM's fully connected layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0,
                 init_bias: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        _init_(self.weight, init_mode, in_features, out_features, init_weight)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            _init_(self.bias, init_mode, in_features, out_features, init_bias)

    def forward(self, x: Tensor) -> Tensor:
        """[..., in] -> [..., out]."""
        return F.linear(x, self.weight.to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))


def resample_kernel(taps: Sequence[float]) -> Tensor:
    """The separable 2-D FIR filter of 1-D taps, normalised to sum 1: [1, 1, k, k]."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


class Conv2d(nn.Module):
    """'Same' convolution with optional 2x up/down-sampling by an FIR filter, as EDM's.

    kernel = 0 means no weight at all: a pure resampling layer. The filter is a buffer
    (``resample_filter``) only when the layer resamples, as in EDM's state dicts. Unfused, the
    filter runs first (transposed, times 4, to go up; strided to go down), then the conv;
    `fused_resample` (NCSN++'s residual encoder) convolves first when going down and upsamples
    first when going up, with the paddings shared between the two.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False,
                 resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0,
                 init_bias: float = 0.0) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a Conv2d resamples up or down, not both")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = self.bias = None
        if kernel:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
            _init_(self.weight, init_mode, fan_in, fan_out, init_weight)
            if bias:
                self.bias = nn.Parameter(torch.empty(out_channels))
                _init_(self.bias, init_mode, fan_in, fan_out, init_bias)
        self.register_buffer("resample_filter",
                             resample_kernel(resample_filter) if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in, H, W] -> [B, out, H', W'] with H' = 2H (up), H / 2 (down) or H."""
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if f is not None and w is not None and self.fused_resample:
            if self.up:
                x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1),
                                       groups=self.in_channels, stride=2,
                                       padding=max(f_pad - w_pad, 0))
                x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
            else:
                x = F.conv2d(x, w, padding=w_pad + f_pad)
                x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels,
                             stride=2)
        else:
            if f is not None and self.up:
                x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1),
                                       groups=self.in_channels, stride=2, padding=f_pad)
            if f is not None and self.down:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                             stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)[None, :, None, None]
        return x


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """EDM's GroupNorm: min(32, channels // 4) groups, weight 1 and bias 0 to start."""
    return nn.GroupNorm(num_groups=min(32, channels // 4), num_channels=channels, eps=eps)


class UNetBlock(nn.Module):
    """EDM's U-Net block (the union of DDPM++, NCSN++ and ADM blocks), [B, in, H, W] -> [B, out, .].

    norm0 -> SiLU -> conv0 (resampling) -> embedding (added, or ADM's scale and shift) -> norm1
    -> SiLU -> dropout -> conv1, plus the skip path (a 1x1 or resampling conv when the shape
    changes), times skip_scale; then optionally multi-head self-attention, residual, times
    skip_scale again.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *,
                 up: bool = False, down: bool = False, attention: bool = False,
                 num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: Init | None = None,
                 init_zero: Init | None = None, init_attn: Init | None = None) -> None:
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else {"init_weight": 0.0}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = 0
        if attention:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = group_norm(out_channels, eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x [B, in, H, W], emb [B, emb_channels] (or [1, ...]) -> [B, out, H', W']."""
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (orig if self.skip is None else self.skip(orig))) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self._attend(self.norm2(x))) + x) * self.skip_scale
        return x

    def _attend(self, h: Tensor) -> Tensor:
        """Multi-head self-attention over pixels, [B, C, H, W] -> [B, C, H, W].

        EDM lays the 3C qkv channels out as [heads, C / heads, 3]: the reshape below must match.
        """
        b, c, height, width = h.shape
        per_head = c // self.num_heads
        q, k, v = self.qkv(h).reshape(b * self.num_heads, per_head, 3, -1).unbind(2)
        logits = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(per_head))  # [BH, HW, HW]
        weights = logits.float().softmax(dim=2).to(q.dtype)
        out = torch.einsum("nqk,nck->ncq", weights, v)  # [BH, C / heads, HW]
        return out.reshape(b, c, height, width)


class PositionalEmbedding(nn.Module):
    """Sinusoidal features [cos | sin] of a noise label, [B] -> [B, num_channels].

    Frequencies (1 / max_positions) ** (i / (n - endpoint)) for i < n = num_channels // 2.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000,
                 endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos | sin] of a noise label (NCSN++), [B] -> [B, num_channels]."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)
