"""EDM's two U-Nets, ``SongUNet`` (DDPM++ / NCSN++) and ``DhariwalUNet`` (ADM): our own code,
weight-compatible with NVlabs/edm's ``training/networks.py``.

Each maps (x [B, C, H, W], noise label [B], one-hot class labels [B, label_dim]) to the raw
output F [B, C, H, W] that a preconditioning (``nets/edm.py``) turns into a denoiser. Module
names are EDM's (``map_noise``, ``map_label``, ``map_augment``, ``map_layer0/1``, ``enc``,
``dec``, ``out_norm``, ``out_conv``; blocks keyed ``16x16_block0`` ...), so state dicts match.

With ``target_time=True`` a network also takes a second noise label, the TraFlow student's
target time (METHOD.md, "The student"): it is embedded like the first one and added through
``s_embed`` (a name EDM never uses) just before the embedding's last SiLU, and ``s_embed``'s
last layer starts at zero, so a student loaded from a teacher computes the teacher.
Augmentation labels (``augment_dim``, 9 on the official CIFAR-10, FFHQ and AFHQ networks) are
a training-time input: sampling, and so traflow, passes none, and the weights are kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traflow_cli.nets.edm_layers import (
    Conv2d,
    FourierEmbedding,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    group_norm,
)

__all__ = ["DhariwalUNet", "SongUNet"]


def _target_branch(noise_channels: int, emb_channels: int) -> nn.Sequential:
    """The student's target-time branch: features -> emb, last layer exactly zero."""
    branch = nn.Sequential(Linear(noise_channels, emb_channels, init_mode="xavier_uniform"),
                           nn.SiLU(), Linear(emb_channels, emb_channels))
    nn.init.zeros_(branch[2].weight)
    nn.init.zeros_(branch[2].bias)
    return branch


def _drop_labels(labels: Tensor, p: float, training: bool) -> Tensor:
    """EDM's label dropout (classifier-free guidance training): zero whole rows with prob. p."""
    if not (training and p):
        return labels
    keep = torch.rand(labels.shape[0], 1, device=labels.device) >= p
    return labels * keep.to(labels.dtype)


class _EDMUNet(nn.Module):
    """What both U-Nets share: the student's target-time branch and the call checks."""

    target_time: bool
    label_dim: int
    s_embed: nn.Sequential

    def _check(self, class_labels: Tensor | None, target_labels: Tensor | None) -> None:
        if self.target_time and target_labels is None:
            raise ValueError("this network is a student (target_time=True): pass the target time")
        if not self.target_time and target_labels is not None:
            raise ValueError("this network has no target-time input (target_time=False)")
        if self.label_dim and class_labels is None:
            raise ValueError(f"class-conditional network ({self.label_dim} classes) needs labels")
        if not self.label_dim and class_labels is not None:
            raise ValueError("class labels given to an unconditional network (label_dim=0)")


class SongUNet(_EDMUNet):
    """DDPM++ (positional embedding, standard encoder, filter [1, 1]) and NCSN++ (Fourier
    embedding, channel_mult_noise 2, residual encoder, filter [1, 3, 3, 1]) in one class.

    Encoder per level: a down-sampling block (below the top level; with encoder_type "skip" an
    FIR-downsampled copy of the input is added through a 1x1 conv, with "residual" a fused
    3x3 down-conv of the running auxiliary image is added and divided by sqrt 2), then
    num_blocks blocks. Decoder from the bottom: two blocks (the first with attention) at the
    lowest level, else an up-sampling block; num_blocks + 1 blocks each fed one encoder
    output; the output image comes from GroupNorm -> SiLU -> conv at the top level (at every
    level, accumulated through FIR up-sampling, with decoder_type "skip").
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *,
                 label_dim: int = 0, augment_dim: int = 0, model_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0,
                 embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1), target_time: bool = False) -> None:
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got "
                             f"{embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got "
                             f"{encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        super().__init__()
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.target_time = target_time
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init: dict = {"init_mode": "xavier_uniform"}
        init_zero: dict = {"init_mode": "xavier_uniform", "init_weight": 1e-5}
        init_attn: dict = {"init_mode": "xavier_uniform", "init_weight": math.sqrt(0.2)}
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout,
                     skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
                     resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero,
                     init_attn=init_attn)

        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True)
                          if embedding_type == "positional" else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = (Linear(augment_dim, noise_channels, bias=False, **init)
                            if augment_dim else None)
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        self._enc_roles: list[tuple[str, str]] = []  # (name, role), in order
        cout = caux = in_channels
        skips: list[int] = []

        def add_enc(name: str, role: str, module: nn.Module, channels: int | None) -> None:
            self.enc[name] = module
            self._enc_roles.append((name, role))
            if channels is not None:
                skips.append(channels)

        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels
                add_enc(f"{res}x{res}_conv", "conv", Conv2d(in_channels, cout, 3, **init), cout)
            else:
                add_enc(f"{res}x{res}_down", "block",
                        UNetBlock(cout, cout, down=True, **block), cout)
                if encoder_type == "skip":
                    add_enc(f"{res}x{res}_aux_down", "aux_down",
                            Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter),
                            None)
                    add_enc(f"{res}x{res}_aux_skip", "aux_skip",
                            Conv2d(caux, cout, 1, **init), None)
                if encoder_type == "residual":
                    add_enc(f"{res}x{res}_aux_residual", "aux_residual",
                            Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                                   fused_resample=True, **init), None)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                add_enc(f"{res}x{res}_block{idx}", "block",
                        UNetBlock(cin, cout, attention=res in attn_resolutions, **block), cout)

        self.dec = nn.ModuleDict()
        self._dec_roles: list[tuple[str, str]] = []
        last_level = len(channel_mult) - 1
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == last_level:
                self._add_dec(f"{res}x{res}_in0", "block",
                              UNetBlock(cout, cout, attention=True, **block))
                self._add_dec(f"{res}x{res}_in1", "block", UNetBlock(cout, cout, **block))
            else:
                self._add_dec(f"{res}x{res}_up", "block", UNetBlock(cout, cout, up=True, **block))
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self._add_dec(f"{res}x{res}_block{idx}", "block_cat",
                              UNetBlock(cin, cout, attention=attn, **block))
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < last_level:
                    self._add_dec(f"{res}x{res}_aux_up", "aux_up",
                                  Conv2d(out_channels, out_channels, 0, up=True,
                                         resample_filter=resample_filter))
                self._add_dec(f"{res}x{res}_aux_norm", "aux_norm", group_norm(cout, eps=1e-6))
                self._add_dec(f"{res}x{res}_aux_conv", "aux_conv",
                              Conv2d(cout, out_channels, 3, **init_zero))
        self._output_name = self._dec_roles[-1][0]
        if target_time:
            self.s_embed = _target_branch(noise_channels, emb_channels)

    def _add_dec(self, name: str, role: str, module: nn.Module) -> None:
        self.dec[name] = module
        self._dec_roles.append((name, role))

    @property
    def output_layer(self) -> Conv2d:
        """The last conv (top level's aux_conv): the layer the adaptive lambda reads."""
        return self.dec[self._output_name]

    def _features(self, noise_labels: Tensor) -> Tensor:
        emb = self.map_noise(noise_labels)
        return emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [sin | cos]

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                target_labels: Tensor | None = None) -> Tensor:
        """x [B, C, H, W], noise labels [B], one-hot labels [B, label_dim], target noise labels
        [B] (students) -> F [B, C, H, W]."""
        self._check(class_labels, target_labels)
        emb = self._features(noise_labels)
        if self.map_label is not None and class_labels is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if target_labels is not None:
            emb = emb + self.s_embed(self._features(target_labels))
        emb = F.silu(emb)

        skips: list[Tensor] = []
        aux = x
        for name, role in self._enc_roles:
            layer = self.enc[name]
            if role == "aux_down":
                aux = layer(aux)
            elif role == "aux_skip":
                x = skips[-1] = x + layer(aux)
            elif role == "aux_residual":
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x, emb) if role == "block" else layer(x)
                skips.append(x)

        out = tmp = None
        for name, role in self._dec_roles:
            layer = self.dec[name]
            if role == "aux_up":
                out = layer(out)
            elif role == "aux_norm":
                tmp = layer(x)
            elif role == "aux_conv":
                tmp = layer(F.silu(tmp))
                out = tmp if out is None else tmp + out
            else:
                if role == "block_cat":
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        return out


class DhariwalUNet(_EDMUNet):
    """ADM (Dhariwal & Nichol): positional embedding, ADM blocks (scale-and-shift embedding,
    64 channels per attention head), plain encoder and decoder, GroupNorm -> SiLU -> conv out.
    Defaults are the official ImageNet-64 network's."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *,
                 label_dim: int = 0, augment_dim: int = 0, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0,
                 target_time: bool = False) -> None:
        super().__init__()
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.target_time = target_time
        emb_channels = model_channels * channel_mult_emb
        init: dict = {"init_mode": "kaiming_uniform", "init_weight": math.sqrt(1 / 3),
                      "init_bias": math.sqrt(1 / 3)}
        init_zero: dict = {"init_mode": "kaiming_uniform", "init_weight": 0.0, "init_bias": 0.0}
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                     init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = nn.ModuleDict()
        cout = in_channels
        skips: list[int] = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block)
                skips.append(cout)

        self.dec = nn.ModuleDict()
        self._dec_cat: list[bool] = []  # whether each decoder block is fed an encoder output
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
                self._dec_cat += [False, False]
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
                self._dec_cat.append(False)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block)
                self._dec_cat.append(True)
        self.out_norm = group_norm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)
        if target_time:
            self.s_embed = _target_branch(model_channels, emb_channels)

    @property
    def output_layer(self) -> Conv2d:
        """The last conv: the layer the adaptive lambda reads."""
        return self.out_conv

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                target_labels: Tensor | None = None) -> Tensor:
        """x [B, C, H, W], noise labels [B], one-hot labels [B, label_dim], target noise labels
        [B] (students) -> F [B, C, H, W]."""
        self._check(class_labels, target_labels)
        emb = F.silu(self.map_layer0(self.map_noise(noise_labels)))
        emb = self.map_layer1(emb)
        if self.map_label is not None and class_labels is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout,
                                                    self.training))
        if target_labels is not None:
            emb = emb + self.s_embed(self.map_noise(target_labels))
        emb = F.silu(emb)

        skips: list[Tensor] = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for layer, cat in zip(self.dec.values(), self._dec_cat, strict=True):
            if cat:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
