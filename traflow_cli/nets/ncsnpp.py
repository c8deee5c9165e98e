"""DDPM++ (NCSN++ family) U-Net, state-dict compatible with the official Rectified Flow code.

The official Rectified Flow networks (gnobitab/RectifiedFlow, built on score_sde_pytorch) are
NCSN++ with BigGAN-style residual blocks, no progressive growing, no FIR filters, sinusoidal
("positional") time embedding fed ``999 * t``, skip rescaling by 1/sqrt(2), zero-scaled output
layers and 1x1 "NIN" attention projections. This module is an independent implementation of
that architecture: every weight lives in one ``nn.ModuleList`` named ``all_modules`` in the
official order and with the official sub-module names, so an official state dict (with its
``module.`` prefix and its unused ``sigmas`` buffer removed, see ``traflow_cli.interop``) loads
with ``strict=True``.

Two additions sit outside ``all_modules`` and so never collide with official weights:
``s_embed`` (the TraFlow student's target-time branch, METHOD.md "The student") and
``class_embed`` (optional class conditioning).

Conventions (METHOD.md): images NCHW in [-1, 1]; t in [0, 1], t = 0 noise, t = 1 data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NCSNpp", "timestep_embedding"]

# Official RF networks see the time as 999 * t (score_sde's "continuous time" label range).
TIME_SCALE = 999.0
# The residual and attention sums are divided by this (official skip_rescale=True).
_SKIP_SCALE = math.sqrt(2.0)


def timestep_embedding(timesteps: Tensor, dim: int, max_positions: int = 10000) -> Tensor:
    """Sinusoidal embedding, [B] -> [B, dim]: sin of all frequencies, then cos.

    Frequencies are max_positions ** (-i / (dim // 2 - 1)) for i < dim // 2, as in DDPM and
    score_sde; an odd ``dim`` gets one trailing zero column. Computed in float32 (as the
    official code, whatever the network's dtype) or in float64 for float64 times, so that
    float64 finite-difference checks in s are not limited by float32 rounding of 999 * s.
    """
    dtype = torch.promote_types(timesteps.dtype, torch.float32)
    half = dim // 2
    exponent = -math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=timesteps.device) * exponent)
    args = timesteps.to(dtype)[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, 2 * half]
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


@torch.no_grad()
def _ddpm_init_(weight: Tensor, scale: float = 1.0) -> None:
    """DDPM initialiser: uniform variance scaling with fan_avg, in place.

    Used for every conv, linear and NIN weight, as in the official code. A scale of 0 means
    1e-10 there (the layer starts almost, but not exactly, at zero); we keep that choice.
    """
    scale = 1e-10 if scale == 0 else scale
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2
    bound = math.sqrt(3.0 * scale / fan_avg)
    weight.uniform_(-bound, bound)


def _conv(in_ch: int, out_ch: int, kernel: int, init_scale: float = 1.0) -> nn.Conv2d:
    """Conv2d with 'same' padding, DDPM init and zero bias."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=kernel // 2)
    _ddpm_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(in_dim: int, out_dim: int) -> nn.Linear:
    """Linear layer with DDPM init and zero bias."""
    layer = nn.Linear(in_dim, out_dim)
    _ddpm_init_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the official group count and epsilon."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


class NIN(nn.Module):
    """Per-pixel linear map (a 1x1 conv) stored as the official ``W`` [in, out] and ``b`` [out]."""

    def __init__(self, in_dim: int, out_dim: int, init_scale: float = 0.1) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_dim, out_dim))
        self.b = nn.Parameter(torch.zeros(out_dim))
        _ddpm_init_(self.W, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        """[..., in] -> [..., out] (applied on channels-last token tensors)."""
        return x @ self.W + self.b


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, residual, divided by sqrt(2)."""

    def __init__(self, channels: int, init_scale: float = 0.0) -> None:
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)  # query
        self.NIN_1 = NIN(channels, channels)  # key
        self.NIN_2 = NIN(channels, channels)  # value
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)  # output projection

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        b, c, h, w = x.shape
        # Plain matmul + softmax rather than SDPA: forward-mode AD (torch.func.jvp in s) must
        # pass through, and the fused SDPA kernels do not all implement it.
        tokens = self.GroupNorm_0(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q = self.NIN_0(tokens)
        k = self.NIN_1(tokens)
        v = self.NIN_2(tokens)
        weights = torch.softmax((q @ k.transpose(1, 2)) * (c**-0.5), dim=-1)  # [B, HW, HW]
        out = self.NIN_3(weights @ v)  # [B, HW, C]
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return (x + out) / _SKIP_SCALE


class ResBlock(nn.Module):
    """BigGAN-style residual block with time-embedding bias and optional 2x resampling.

    Resampling without FIR (official fir=False): nearest-neighbour up, 2x2 mean-pool down,
    applied to both the residual branch (after the first norm + act) and the skip path.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        *,
        temb_dim: int,
        dropout: float,
        up: bool = False,
        down: bool = False,
        init_scale: float = 0.0,
    ) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        self.up = up
        self.down = down
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv(in_ch, out_ch, 3)
        self.Dense_0 = _linear(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, 3, init_scale=init_scale)
        # The skip path needs a 1x1 conv whenever its shape changes (channels or resolution).
        self.Conv_2 = _conv(in_ch, out_ch, 1) if (in_ch != out_ch or up or down) else None

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x [B, in_ch, H, W], temb [B, temb_dim] -> [B, out_ch, H', W'] (H' = 2H, H/2 or H)."""
        h = F.silu(self.GroupNorm_0(x))
        h = self.Conv_0(self._resample(h))
        h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Dropout_0(F.silu(self.GroupNorm_1(h)))
        h = self.Conv_1(h)
        skip = self._resample(x)
        if self.Conv_2 is not None:
            skip = self.Conv_2(skip)
        return (skip + h) / _SKIP_SCALE


class NCSNpp(nn.Module):
    """DDPM++ velocity network v(x, t), or with ``target_time=True`` the student u(x, t, s).

    Layout of ``all_modules`` (official order): two time-embedding linears, the input conv,
    the encoder (per level: ``num_res_blocks`` blocks, each followed by attention at
    ``attn_resolutions``, then a down-sampling block except at the last level), the middle
    (block, attention, block), the decoder (per level: ``num_res_blocks + 1`` blocks fed the
    concatenated skip, attention, then an up-sampling block except at the top level), the
    output GroupNorm and the output conv.
    """

    # A rectified flow, defined on all of t in [0, 1] (see MLPVelocity.sigma_range).
    sigma_range: tuple[float, float] | None = None

    def __init__(
        self,
        *,
        image_size: int = 32,
        in_channels: int = 3,
        nf: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        num_classes: int = 0,
        target_time: bool = False,
    ) -> None:
        super().__init__()
        if nf % 2 or nf < 4:
            raise ValueError(f"nf must be even and at least 4, got {nf}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.nf = nf
        self.ch_mult = tuple(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = tuple(attn_resolutions)
        self.num_classes = num_classes
        self.target_time = target_time
        num_levels = len(self.ch_mult)
        # Attention is decided per level from the nominal resolution, fixed at construction,
        # so forward() has no shape-dependent branching (torch.compile friendly).
        self._attn_at_level = tuple(
            (image_size // 2**level) in self.attn_resolutions for level in range(num_levels)
        )
        temb_dim = 4 * nf
        block = dict(temb_dim=temb_dim, dropout=dropout)

        modules: list[nn.Module] = [_linear(nf, temb_dim), _linear(temb_dim, temb_dim)]
        modules.append(_conv(in_channels, nf, 3))
        skip_channels = [nf]  # channels of every tensor the decoder will concatenate
        ch = nf
        for level, mult in enumerate(self.ch_mult):
            for _ in range(num_res_blocks):
                modules.append(ResBlock(ch, nf * mult, **block))
                ch = nf * mult
                if self._attn_at_level[level]:
                    modules.append(AttnBlock(ch))
                skip_channels.append(ch)
            if level != num_levels - 1:
                modules.append(ResBlock(ch, down=True, **block))
                skip_channels.append(ch)
        modules += [ResBlock(ch, **block), AttnBlock(ch), ResBlock(ch, **block)]
        for level in reversed(range(num_levels)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * self.ch_mult[level]
                modules.append(ResBlock(ch + skip_channels.pop(), out_ch, **block))
                ch = out_ch
            if self._attn_at_level[level]:
                modules.append(AttnBlock(ch))
            if level != 0:
                modules.append(ResBlock(ch, up=True, **block))
        modules.append(_group_norm(ch))
        modules.append(_conv(ch, in_channels, 3, init_scale=0.0))
        self.all_modules = nn.ModuleList(modules)

        if target_time:
            # Target-time branch (METHOD.md, "The student"): embeds s like t; its last layer
            # starts at exactly zero so the student with teacher weights IS the teacher.
            self.s_embed = nn.Sequential(
                _linear(nf, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
            )
            nn.init.zeros_(self.s_embed[2].weight)
            nn.init.zeros_(self.s_embed[2].bias)
        if num_classes > 0:
            # Zero start: a class-conditional net initialised from an unconditional teacher
            # still computes the teacher; gradients reach the rows through the temb layers.
            self.class_embed = nn.Embedding(num_classes, temb_dim)
            nn.init.zeros_(self.class_embed.weight)

    @property
    def output_layer(self) -> nn.Conv2d:
        """The final conv (a property, so its weights are not registered under a second name)."""
        return self.all_modules[-1]

    def _embed_time(self, t: Tensor, batch: int) -> Tensor:
        """t [B] or [] in [0, 1] -> sinusoidal embedding of 999 * t, [B, nf]."""
        if t.dim() == 0:
            t = t.expand(batch)
        emb = timestep_embedding(t * TIME_SCALE, self.nf)
        return emb.to(self.all_modules[0].weight.dtype)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        s: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """x [B,C,H,W] in [-1,1]; t, s [B] in [0,1] (t=0 noise, t=1 data); returns [B,C,H,W]."""
        if self.target_time and s is None:
            raise ValueError("this NCSNpp is a student (target_time=True): pass the target time s")
        if not self.target_time and s is not None:
            raise ValueError("this NCSNpp has no target-time input (target_time=False); s given")
        if self.num_classes > 0 and class_labels is None:
            raise ValueError(f"class-conditional NCSNpp ({self.num_classes} classes) needs labels")
        if self.num_classes == 0 and class_labels is not None:
            raise ValueError("class_labels given to an unconditional NCSNpp (num_classes=0)")

        mods = self.all_modules
        batch = x.shape[0]
        temb = mods[1](F.silu(mods[0](self._embed_time(t, batch))))  # [B, 4nf]
        if s is not None:
            temb = temb + self.s_embed(self._embed_time(s, batch))
        if class_labels is not None:
            temb = temb + self.class_embed(class_labels)

        i = 2
        hs = [mods[i](x)]  # encoder outputs, consumed in reverse by the decoder
        i += 1
        num_levels = len(self.ch_mult)
        for level in range(num_levels):
            for _ in range(self.num_res_blocks):
                h = mods[i](hs[-1], temb)
                i += 1
                if self._attn_at_level[level]:
                    h = mods[i](h)
                    i += 1
                hs.append(h)
            if level != num_levels - 1:
                hs.append(mods[i](hs[-1], temb))  # down-sampling block
                i += 1

        h = mods[i](hs[-1], temb)
        h = mods[i + 1](h)
        h = mods[i + 2](h, temb)
        i += 3

        for level in reversed(range(num_levels)):
            for _ in range(self.num_res_blocks + 1):
                h = mods[i](torch.cat([h, hs.pop()], dim=1), temb)
                i += 1
            if self._attn_at_level[level]:
                h = mods[i](h)
                i += 1
            if level != 0:
                h = mods[i](h, temb)  # up-sampling block
                i += 1

        h = F.silu(mods[i](h))
        return mods[i + 1](h)
