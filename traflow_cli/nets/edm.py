"""EDM teachers as rectified-flow velocities: NVlabs/edm's preconditionings and the change of
variables into traflow's conventions (METHOD.md, "Conventions").

EDM writes a noisy image as x = data + sigma * noise and its network as a denoiser
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), F one of the U-Nets of ``edm_unets``.
traflow writes x_t = t * data + (1 - t) * noise, t = 0 noise, t = 1 data. The two meet at
sigma = (1 - t) / t (t = 1 / (1 + sigma)): x_t / t is EDM's state, and the velocity of the
probability-flow ODE is

    v(x_t, t) = (D(x_t / t; sigma) - x_t) / (1 - t).

The network is only evaluated inside [max(0.002, sigma_min), min(80, sigma_max)] of the file
(EDM's sampler never leaves it): t is clamped into [t_min, t_max] = [1 / (1 + sigma_hi),
1 / (1 + sigma_lo)] first, so every t in [0, 1] gives a finite velocity. Below t_min the
velocity is the one at t_min for the same x_t (the denoiser has saturated there: D is close
to the data mean); above t_max it is the one at t_max (the last 0.2% of the path, which EDM
covers with one Euler step from sigma_lo).

The TraFlow student goes through the same parameterisation (CTM's form): with g the denoiser
given the target noise level sigma_s as a second input,

    G(x_t, t, s) = ((1 - s) / (1 - t)) x_t + ((s - t) / (1 - t)) g(x_t / t; sigma_t, sigma_s),

i.e. u = (g - x_t) / (1 - t), so G(x_t, t, 1) = g is a denoiser output, and a fresh student
(zero target branch, g = D) jumps exactly as the teacher's Euler step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traflow_cli.flow import EDM_SIGMA_MAX, EDM_SIGMA_MIN, per_sample, time_of_sigma
from traflow_cli.nets.edm_unets import DhariwalUNet, SongUNet

__all__ = ["EDMNet", "EDMPreconditioning", "PRECONDITIONINGS", "VEPreconditioning",
           "VPPreconditioning"]

Coefficients = tuple[Tensor, Tensor, Tensor]  # c_skip, c_out, c_in, each like sigma


@dataclass(frozen=True)
class EDMPreconditioning:
    """EDM's own (EDMPrecond): unit-variance input and target for data of std sigma_data."""

    sigma_data: float = 0.5
    sigma_min: float = 0.0
    sigma_max: float | None = None  # None: no upper limit (EDM's float('inf'))

    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.sigma_min, math.inf if self.sigma_max is None else self.sigma_max

    def coefficients(self, sigma: Tensor) -> Coefficients:
        var = sigma**2 + self.sigma_data**2
        return self.sigma_data**2 / var, sigma * self.sigma_data / var.sqrt(), 1 / var.sqrt()

    def noise_label(self, sigma: Tensor) -> Tensor:
        return sigma.log() / 4


@dataclass(frozen=True)
class VPPreconditioning:
    """Variance preserving (VPPrecond): score_sde's VP SDE, F predicts the noise (c_out = -sigma),
    the network sees (M - 1) t(sigma) with sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    epsilon_t: float = 1e-5

    def sigma_of_time(self, t: float) -> float:
        """sigma(t), in float32 as EDM computes its sigma_min and sigma_max (the grid's ends)."""
        tt = torch.tensor(t, dtype=torch.float32, device="cpu")  # also under a meta device
        return float(((0.5 * self.beta_d * tt**2 + self.beta_min * tt).exp() - 1).sqrt())

    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.sigma_of_time(self.epsilon_t), self.sigma_of_time(1.0)

    def coefficients(self, sigma: Tensor) -> Coefficients:
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt()

    def noise_label(self, sigma: Tensor) -> Tensor:
        root = (self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)).sqrt()
        return (self.M - 1) * (root - self.beta_min) / self.beta_d


@dataclass(frozen=True)
class VEPreconditioning:
    """Variance exploding (VEPrecond): F predicts sigma-scaled noise, label log(sigma / 2)."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0

    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def coefficients(self, sigma: Tensor) -> Coefficients:
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma)

    def noise_label(self, sigma: Tensor) -> Tensor:
        return (0.5 * sigma).log()


Preconditioning = EDMPreconditioning | VPPreconditioning | VEPreconditioning
PRECONDITIONINGS: dict[str, type[Preconditioning]] = {
    "edm": EDMPreconditioning, "vp": VPPreconditioning, "ve": VEPreconditioning}
UNETS: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


class EDMNet(nn.Module):
    """An EDM network seen as a traflow teacher v(x_t, t) or, with target_time=True, a student
    u(x_t, t, s); x [B, C, H, W] in [-1, 1], t, s [B] (or scalars) in [0, 1].

    ``model`` holds the U-Net under EDM's own name, so the state dict of an EDM ``ema`` module
    loads with strict=True. `precond` is {"kind": "edm" | "vp" | "ve", its keyword arguments};
    `model` is {"type": "SongUNet" | "DhariwalUNet", the U-Net's keyword arguments}.
    Class labels are integers [B] (one-hot inside) or EDM's label vectors [B, num_classes].
    """

    def __init__(self, *, image_size: int, in_channels: int = 3, num_classes: int = 0,
                 precond: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
                 target_time: bool = False) -> None:
        super().__init__()
        precond_kwargs = dict(precond or {})
        kind = precond_kwargs.pop("kind", "edm")
        model_kwargs = dict(model or {"type": "SongUNet"})
        model_type = model_kwargs.pop("type")
        if kind not in PRECONDITIONINGS:
            raise ValueError(f"unknown preconditioning {kind!r}; expected one of "
                             f"{sorted(PRECONDITIONINGS)}")
        if model_type not in UNETS:
            raise ValueError(f"unknown EDM network {model_type!r}; expected one of {sorted(UNETS)}")
        self.precond = PRECONDITIONINGS[kind](**precond_kwargs)
        self.model = UNETS[model_type](image_size, in_channels, in_channels,
                                       label_dim=num_classes, target_time=target_time,
                                       **model_kwargs)
        self.num_classes = num_classes
        self.target_time = target_time
        file_min, file_max = self.precond.sigma_range
        self.sigma_lo = max(EDM_SIGMA_MIN, file_min)
        self.sigma_hi = min(EDM_SIGMA_MAX, file_max)
        if not self.sigma_lo < self.sigma_hi:
            raise ValueError(f"empty noise range: [{self.sigma_lo}, {self.sigma_hi}]")
        self.t_min = time_of_sigma(self.sigma_hi)
        self.t_max = time_of_sigma(self.sigma_lo)

    @property
    def sigma_range(self) -> tuple[float, float]:
        """(sigma_lo, sigma_hi): where the network is evaluated, and the Karras grid's ends."""
        return self.sigma_lo, self.sigma_hi

    @property
    def output_layer(self) -> nn.Module:
        """The U-Net's last conv (read by TraFlow's adaptive lambda)."""
        return self.model.output_layer

    def denoise(self, y: Tensor, sigma: Tensor, labels: Tensor | None = None,
                target_sigma: Tensor | None = None) -> Tensor:
        """EDM's D(y; sigma) (or the student's g(y; sigma, sigma_s)) for states y [B, C, H, W] in
        EDM's scale, sigma [B], one-hot labels [B, num_classes]; no clamping here."""
        c_skip, c_out, c_in = self.precond.coefficients(sigma)
        dtype = self.model.map_layer0.weight.dtype
        out = self.model(
            (per_sample(c_in, y) * y).to(dtype), self.precond.noise_label(sigma).to(dtype),
            None if labels is None else labels.to(dtype),
            None if target_sigma is None else self.precond.noise_label(target_sigma).to(dtype))
        return per_sample(c_skip, y) * y + per_sample(c_out, y) * out.to(y.dtype)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None,
                class_labels: Tensor | None = None) -> Tensor:
        """Teacher: v(x_t, t); student: u(x_t, t, s), with G = x_t + (s - t) u. [B, C, H, W]."""
        if self.target_time and s is None:
            raise ValueError("this network is a student (target_time=True): pass the target time s")
        if not self.target_time and s is not None:
            raise ValueError("this network is a teacher (target_time=False): it takes no s")
        work = torch.promote_types(x.dtype, torch.float32)
        xw = x.to(work)
        t_c = self._clamp(t, x.shape[0], work)
        tb = per_sample(t_c, xw)
        target_sigma = None if s is None else self._sigma(self._clamp(s, x.shape[0], work))
        denoised = self.denoise(xw / tb, self._sigma(t_c), self._labels(class_labels, x, work),
                                target_sigma)
        return ((denoised - xw) / (1 - tb)).to(x.dtype)

    def _clamp(self, t: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
        """t [B] or [] -> [B], inside [t_min, t_max] (the file's noise range)."""
        t = t.to(dtype)
        if t.dim() == 0:
            t = t.expand(batch)
        return t.clamp(self.t_min, self.t_max)

    @staticmethod
    def _sigma(t: Tensor) -> Tensor:
        return (1 - t) / t

    def _labels(self, labels: Tensor | None, x: Tensor, dtype: torch.dtype) -> Tensor | None:
        """Integer classes [B] -> one-hot [B, num_classes]; label vectors pass as they are."""
        if self.num_classes == 0:
            if labels is not None:
                raise ValueError("class_labels given to an unconditional EDM network")
            return None
        if labels is None:
            raise ValueError(f"this EDM network is class-conditional ({self.num_classes} "
                             "classes): pass class_labels")
        if labels.dim() == 2:
            if labels.shape != (x.shape[0], self.num_classes):
                raise ValueError(f"label vectors must be [{x.shape[0]}, {self.num_classes}], got "
                                 f"{list(labels.shape)}")
            return labels.to(dtype)
        return F.one_hot(labels.long(), self.num_classes).to(dtype)
