"""A trained teacher or student read back from its run folder (weights and network description).

Jobs load models through here; `traflow_cli.api` re-exports the same names for notebooks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from traflow_cli.engine.checkpoint import CheckpointError, run_checkpoint
from traflow_cli.nets import build_net
from traflow_cli.sampling import (
    sample_student,
    sample_teacher,
    start_state,
    student_grid_times,
    teacher_velocity,
)
from traflow_cli.traflow import call_net, jump


class Teacher(nn.Module):
    """A teacher, rectified flow or EDM alike: velocity(x [B, ...] in [-1, 1], t [B] in [0, 1])
    -> [B, ...], and sample(noise) -> data-end images.

    An EDM network's velocity comes through its preconditioning (nets/edm.py). `native_grid`
    is the grid the run was made for ("karras" for EDM imports, else "uniform"); `sample`
    uses it unless told otherwise.
    """

    def __init__(self, net: nn.Module, config: dict, native_grid: str = "uniform") -> None:
        super().__init__()
        self.net = net
        self.config = config
        self.native_grid = native_grid

    @property
    def sigma_range(self) -> tuple[float, float] | None:
        """An EDM teacher's (sigma_lo, sigma_hi), where it is evaluated; None for a rectified flow."""
        return getattr(self.net, "sigma_range", None)

    def velocity(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """v(x_t, t) [B, ...]; class_labels are integer classes [B] for conditional teachers."""
        return call_net(self.net, x, t, labels=class_labels)

    forward = velocity

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 18, solver: str = "heun", grid: str | None = None,
               class_labels: Tensor | None = None, rtol: float = 1e-5,
               atol: float = 1e-5) -> Tensor:
        """Solve the teacher's ODE from noise [B, ...] to the data end (t = 1); returns [B, ...].

        solver: "euler", "heun" (in EDM's coordinates for an EDM teacher) or "rk45" (adaptive:
        `steps` and `grid` unused); grid: "uniform" or "karras" (default: the native grid). An
        EDM teacher starts at t_min = 1 / (1 + sigma_max) from (1 - t_min) * noise, so
        sample(latents, steps=18, solver="heun", grid="karras") is EDM's edm_sampler(latents).
        """
        velocity = teacher_velocity(self.net, class_labels)
        x, _ = sample_teacher(velocity, noise, solver=solver, steps=steps, rtol=rtol, atol=atol,
                              grid=grid or self.native_grid, sigma_range=self.sigma_range)
        return x


class Student(nn.Module):
    """A TraFlow student: jump(x, t, s) = G(x, t, s) = x + (s - t) u(x, t, s).

    `time_grid` and `grid_steps` are the teacher grid it was distilled on: `times(nfe)` places
    its jumps on that grid, from where the teacher's solves started (t = 0 for a rectified flow,
    t_min = 1 / (1 + sigma_max) for an EDM teacher) to the data end.
    """

    def __init__(self, net: nn.Module, config: dict, time_grid: str = "uniform",
                 grid_steps: int = 18) -> None:
        super().__init__()
        self.net = net
        self.config = config
        self.time_grid = time_grid
        self.grid_steps = grid_steps

    @property
    def sigma_range(self) -> tuple[float, float] | None:
        """Its EDM teacher's (sigma_lo, sigma_hi); None for a rectified-flow student."""
        return getattr(self.net, "sigma_range", None)

    def jump(self, x: Tensor, t: Tensor, s: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return jump(self.net, x, t, s, class_labels)

    forward = jump

    def times(self, nfe: int, grid: str | None = None) -> Tensor:
        """The jump times [nfe + 1] for `nfe` jumps on its grid (or on `grid`)."""
        return student_grid_times(nfe, grid or self.time_grid, self.grid_steps, self.sigma_range)

    @torch.no_grad()
    def sample(self, noise: Tensor, nfe: int = 1, class_labels: Tensor | None = None) -> Tensor:
        """Samples from noise [B, ...] with `nfe` jumps; noise is scaled to the first time's
        state, (1 - t_0) noise, as the teacher's solves began."""
        times = self.times(nfe)
        return sample_student(self.net, start_state(noise, times[0]), times,
                              labels=class_labels)


def _load_net(run_dir: str | Path, role: str, device: str | torch.device
          ) -> tuple[nn.Module, dict, dict[str, str]]:
    ckpt = run_checkpoint(Path(run_dir))
    saved_role = ckpt.metadata.get("role")
    if saved_role != role:
        raise CheckpointError(f"{run_dir}: holds a {saved_role}, not a {role}")
    config = ckpt.net_config()
    net = build_net(config, target_time=role == "student")
    prefix = "ema" if "ema" in ckpt.prefixes() else "net"
    net.load_state_dict(ckpt.weights(prefix))
    return net.to(device).eval().requires_grad_(False), config, ckpt.metadata


def load_teacher(run_dir: str | Path, device: str | torch.device = "cpu") -> Teacher:
    """The teacher of a `traflow teacher train|import` run folder (its EMA weights)."""
    net, config, metadata = _load_net(run_dir, "teacher", device)
    return Teacher(net, config, native_grid=metadata.get("native_grid", "uniform")).eval()


def load_student(run_dir: str | Path, device: str | torch.device = "cpu") -> Student:
    """The student of a `traflow distill` run folder (its evaluation-EMA weights)."""
    net, config, metadata = _load_net(run_dir, "student", device)
    # Students distilled before the grid was recorded used the uniform grid of the spec.
    return Student(net, config, time_grid=metadata.get("time_grid", "uniform"),
                   grid_steps=int(metadata.get("grid_steps", "18"))).eval()
