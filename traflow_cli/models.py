"""A trained teacher or student read back from its run folder (weights and network description).

Jobs load models through here; the package root (`from traflow_cli import load_teacher`) gives
notebooks the same names.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from traflow_cli.engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    run_checkpoint,
    sha256_file,
)
from traflow_cli.grids import GRIDS, student_grid_times
from traflow_cli.nets import build_net
from traflow_cli.nets.limits import check_net_limits
from traflow_cli.objectives.shared import call_net, jump
from traflow_cli.sampling import (
    sample_student,
    sample_teacher,
    start_state,
    teacher_velocity,
)
from traflow_cli.specs import NetSpec

MAX_GRID_STEPS = 100_000
_EDITED = "the checkpoint was edited or written by another tool; restore it or use an earlier one"


class Teacher(nn.Module):
    """A teacher, rectified flow or EDM alike: velocity(x [B, ...] in [-1, 1], t [B] in [0, 1])
    -> [B, ...], and sample(noise) -> data-end images.

    An EDM network's velocity comes through its preconditioning (nets/edm.py). `native_grid`
    is the grid the run was made for ("karras" for EDM imports, else "uniform"); `sample`
    uses it unless told otherwise.
    """

    def __init__(self, net: nn.Module, config: dict, native_grid: str = "uniform",
                 sha256: str | None = None) -> None:
        super().__init__()
        self.net = net
        self.config = config
        self.native_grid = native_grid
        self.sha256 = sha256  # of the weights file it was read from: which teacher this is

    @property
    def sigma_range(self) -> tuple[float, float] | None:
        """An EDM teacher's (sigma_lo, sigma_hi), where it is evaluated; None for a rectified flow
        (every network declares it: nets/mlp.py, nets/ncsnpp.py, nets/edm.py)."""
        return self.net.sigma_range

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
        return self.net.sigma_range

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


@cache
def _net_spec() -> TypeAdapter:
    return TypeAdapter(NetSpec)


def _first_error(exc: ValidationError) -> str:
    """`field: message` of a validation error's first entry, without pydantic's union tags."""
    err = exc.errors()[0]
    loc = [str(part) for part in err["loc"]]
    tags = {"mlp", "ncsnpp", "edm", "vp", "ve", "SongUNet", "DhariwalUNet"}
    loc = [part for i, part in enumerate(loc)
           if not (part in tags and (i == 0 or loc[i - 1] in ("precond", "model")))]
    field = ".".join(["net_config", *loc])
    if err["type"] == "extra_forbidden":
        return f"{field} is not a setting of this network"
    return f"{field}: {err['msg'].removeprefix('Value error, ')}"


def checked_net_config(ckpt: Checkpoint) -> dict[str, Any]:
    """A checkpoint's network description, validated like a spec (types, allowed keys) and
    bounded (nets.limits) before anything is built from it; one line naming the field."""
    config = ckpt.net_config()
    try:
        _net_spec().validate_python(config)
        check_net_limits(config)
    except ValidationError as exc:
        raise CheckpointError(f"{ckpt.path}: metadata {_first_error(exc)}; {_EDITED}") from None
    except ValueError as err:
        raise CheckpointError(f"{ckpt.path}: metadata {err}; {_EDITED}") from None
    return config


def _read_net(ckpt: Checkpoint, role: str) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's network (CPU) and its config: the config validated, the network built
    on the meta device and the file's tensor names, shapes and dtypes checked against it from
    the header, so that nothing larger than the file is allocated; the weights must be finite.
    The grid metadata the role reads back (Teacher.native_grid, Student.time_grid and
    grid_steps) is checked here too."""
    if role == "teacher":
        _metadata_grid(ckpt, "native_grid")
    else:
        _metadata_grid(ckpt, "time_grid")
        _metadata_grid_steps(ckpt)
    config = checked_net_config(ckpt)
    target_time = role == "student"
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            shapes = build_net(config, target_time=target_time).state_dict()
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError, IndexError, KeyError,
            OverflowError) as err:
        raise CheckpointError(f"{ckpt.path}: metadata net_config builds no network "
                              f"({type(err).__name__}: {str(err)[:160]}); {_EDITED}") from None
    prefix = "ema" if "ema" in ckpt.prefixes() else "net"
    weights = ckpt.weights(prefix, expected=shapes)
    for name, value in weights.items():
        # A run that diverged saved NaN or infinite weights: say so, rather than sample NaNs or
        # distill from them (which would read as the student's learning rate being too high).
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            fix = ("train the teacher again (e.g. with a lower teacher.lr) or use a finite one"
                   if role == "teacher" else "distill again, e.g. with a lower distill.lr")
            raise CheckpointError(f"{ckpt.path}: the {role}'s weights are not finite (NaN or "
                                  f"infinity at '{prefix}.{name}'): the run that saved them had "
                                  f"diverged; {fix}")
    net = build_net(config, target_time=target_time)
    net.load_state_dict(weights)
    return net, config


def _metadata_grid(ckpt: Checkpoint, key: str) -> None:
    value = ckpt.metadata.get(key, "uniform")
    if value not in GRIDS:
        raise CheckpointError(f"{ckpt.path}: metadata '{key}' is {value[:40]!r}; expected one of "
                              f"{', '.join(GRIDS)}; {_EDITED}")


def _metadata_grid_steps(ckpt: Checkpoint) -> None:
    # Students distilled before the grid was recorded used the spec's default of 18 steps.
    value = ckpt.metadata.get("grid_steps", "18")
    if not re.fullmatch(r"[0-9]{1,6}", value) or not 1 <= int(value) <= MAX_GRID_STEPS:
        raise CheckpointError(f"{ckpt.path}: metadata 'grid_steps' is {value[:40]!r}; expected a "
                              f"whole number from 1 to {MAX_GRID_STEPS}; {_EDITED}")


def _load_net(run_dir: str | Path, role: str, device: str | torch.device
          ) -> tuple[nn.Module, dict, dict[str, str], str]:
    """(network on `device`, its config, the checkpoint's metadata, its weights' sha256)."""
    ckpt = run_checkpoint(Path(run_dir))
    saved_role = ckpt.metadata.get("role")
    if saved_role != role:
        raise CheckpointError(f"{run_dir}: holds a {str(saved_role)[:40]}, not a {role}")
    net, config = _read_net(ckpt, role)
    sha = ckpt.sha256 or sha256_file(ckpt.path)  # runs from before manifests have none stored
    return net.to(device).eval().requires_grad_(False), config, ckpt.metadata, sha


def load_teacher(run_dir: str | Path, device: str | torch.device = "cpu") -> Teacher:
    """The teacher of a `traflow teacher train|import` run folder (its EMA weights)."""
    net, config, metadata, sha = _load_net(run_dir, "teacher", device)
    return Teacher(net, config, native_grid=metadata.get("native_grid", "uniform"),
                   sha256=sha).eval()


def load_student(run_dir: str | Path, device: str | torch.device = "cpu") -> Student:
    """The student of a `traflow distill` run folder (its evaluation-EMA weights)."""
    net, config, metadata, _ = _load_net(run_dir, "student", device)
    # Students distilled before the grid was recorded used the uniform grid of the spec.
    return Student(net, config, time_grid=metadata.get("time_grid", "uniform"),
                   grid_steps=int(metadata.get("grid_steps", "18"))).eval()
