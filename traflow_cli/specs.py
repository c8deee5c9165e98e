"""Pydantic run specs: one validated description of a run, saved beside its outputs.

No torch here, so --help, --dry-run and spec errors are instant. Every section forbids unknown
keys, so a typo in a preset or a --set override fails before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from traflow_cli.errors import UserError

TOY_DATASETS = ("checkerboard", "ring8")
IMAGE_DATASETS = ("cifar10", "celeba64", "ffhq64", "imagenet64", "shapes32", "folder")
Unit = Annotated[float, Field(ge=0.0, lt=1.0)]
OnOff = Literal["auto", "on", "off"]


class SpecError(UserError, ValueError):
    """A spec that cannot run; the message is one line naming the field and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RuntimeSpec(Section):
    """Where and how tensors run; "auto" turns a speed option on only where it is safe (CUDA)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: OnOff = "auto"
    channels_last: OnOff = "auto"
    cuda_graphs: OnOff = "auto"
    tf32: bool = True


class DataSpec(Section):
    """Training data: an exact toy distribution or an image dataset in [-1, 1]."""

    name: Literal["checkerboard", "ring8", "cifar10", "celeba64", "ffhq64", "imagenet64",
                  "shapes32", "folder"] = "ring8"
    path: str | None = None
    resolution: PositiveInt = 32
    channels: PositiveInt = 3
    hflip: bool = False
    use_labels: bool = False
    download: bool = False
    preload: bool = True

    @property
    def is_toy(self) -> bool:
        return self.name in TOY_DATASETS


class MLPNetSpec(Section):
    kind: Literal["mlp"] = "mlp"
    dim: PositiveInt = 2
    hidden: PositiveInt = 256
    depth: PositiveInt = 3
    time_dim: PositiveInt = 64


class NCSNppNetSpec(Section):
    """DDPM++/NCSN++ as in the official Rectified Flow code (state-dict compatible)."""

    kind: Literal["ncsnpp"] = "ncsnpp"
    image_size: PositiveInt = 32
    in_channels: PositiveInt = 3
    nf: PositiveInt = 128
    ch_mult: list[PositiveInt] = [1, 2, 2, 2]
    num_res_blocks: PositiveInt = 4
    attn_resolutions: list[PositiveInt] = [16]
    dropout: Unit = 0.1
    num_classes: NonNegativeInt = 0


NetSpec = Annotated[MLPNetSpec | NCSNppNetSpec, Field(discriminator="kind")]


class TrainingSpec(Section):
    """Optimiser, duration and bookkeeping shared by teacher training and distillation."""

    batch_size: PositiveInt = 512
    lr: PositiveFloat = 1e-3
    betas: tuple[Unit, Unit] = (0.9, 0.999)
    weight_decay: NonNegativeFloat = 0.0
    warmup_steps: NonNegativeInt = 0
    grad_clip: PositiveFloat | None = 1.0
    duration_steps: PositiveInt = 2000
    log_every_steps: PositiveInt = 50
    checkpoint_every_steps: PositiveInt = 500
    keep_checkpoints: PositiveInt = 2
    ema_decay: Unit = 0.999


class TeacherSpec(TrainingSpec):
    """Rectified-flow teacher training: E||v(x_t, t) - (data - noise)||^2, t ~ U[t_eps, 1]."""

    t_eps: Unit = 1e-3


class DistillSpec(TrainingSpec):
    """TraFlow distillation (METHOD.md); field names follow traflow.TraFlowConfig."""

    teacher: str | None = None
    grid_steps: PositiveInt = 18
    teacher_solver: Literal["heun", "euler"] = "heun"
    start: Literal["teacher", "data"] = "teacher"
    w_out: NonNegativeFloat = 1.0
    w_vel: NonNegativeFloat = 1.0
    w_sc: NonNegativeFloat = 1.0
    w_fm: NonNegativeFloat = 0.0
    lambda_vel: Literal["adaptive"] | PositiveFloat = "adaptive"
    lambda_clip: tuple[PositiveFloat, PositiveFloat] = (0.01, 10.0)
    distance: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: PositiveFloat = 0.03
    derivative: Literal["jvp", "fd"] = "jvp"
    fd_step: PositiveFloat = 1e-3
    vel_every: PositiveInt = 1
    target_ema: Unit = 0.9999
    trajectory_cache: NonNegativeInt = 0

    @model_validator(mode="after")
    def _coherent(self) -> DistillSpec:
        if self.w_out == self.w_vel == self.w_sc == self.w_fm == 0:
            raise ValueError("every loss weight is 0; set at least one of w_out, w_vel, w_sc, w_fm")
        if self.start == "data" and self.trajectory_cache > 0:
            raise ValueError("trajectory_cache needs start='teacher' (cached solves start at noise)")
        if self.lambda_clip[0] > self.lambda_clip[1]:
            raise ValueError("lambda_clip must be (low, high) with low <= high")
        return self


def check_teacher_run(path: str | None) -> None:
    """The distill job's precondition, checked before any work (not at validation: a finished
    student's spec stays loadable after its teacher folder has moved)."""
    if path is None:
        raise SpecError("distill.teacher: required; pass --teacher RUN_DIR (a teacher run folder)")
    if not (Path(path) / "spec.json").is_file():
        raise SpecError(f"distill.teacher: no teacher run at {path!r} (expected the folder "
                        "written by 'traflow teacher train' or 'traflow teacher import')")


class SampleSpec(Section):
    """What `traflow sample` writes. Teacher runs use `solver`; students use `nfe`/`times`."""

    nfe: PositiveInt = 1
    num_samples: PositiveInt = 10_000
    batch_size: PositiveInt = 500
    times: list[float] | None = None
    gamma: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    solver: Literal["euler", "heun", "rk45"] = "euler"
    steps: PositiveInt = 100
    rtol: PositiveFloat = 1e-5
    atol: PositiveFloat = 1e-5
    format: Literal["png", "npz", "both"] = "png"
    class_label: NonNegativeInt | None = None
    grid: bool = True

    @model_validator(mode="after")
    def _times_match_nfe(self) -> SampleSpec:
        if self.times is not None:
            if len(self.times) != self.nfe + 1:
                raise ValueError(f"times has {len(self.times)} entries; nfe={self.nfe} needs "
                                 f"{self.nfe + 1} (from 0 to 1)")
            if self.times[0] != 0 or self.times[-1] != 1 or any(
                    b <= a for a, b in zip(self.times, self.times[1:], strict=False)):
                raise ValueError("times must increase strictly from 0 to 1")
        return self


class EvalSpec(Section):
    """Toy distances and image metrics: what `traflow eval` measures by default."""

    num_samples: PositiveInt = 10_000
    student_nfe: list[PositiveInt] = [1, 2, 4]
    teacher_steps: list[PositiveInt] = [1, 2, 4, 100]
    projections: PositiveInt = 1000
    mmd_samples: PositiveInt = 4000
    fid_mode: Literal["legacy_tensorflow", "clean", "legacy_pytorch"] = "legacy_tensorflow"
    fid_reference: str | None = None
    fid_split: Literal["train", "test"] = "train"


class BenchSpec(Section):
    """Throughput and latency measured by `traflow bench`."""

    batch_size: PositiveInt = 256
    student_nfe: list[PositiveInt] = [1, 2, 4]
    teacher_steps: list[PositiveInt] = [1, 10, 100]
    rk45: bool = True
    repeats: PositiveInt = 5
    warmup: NonNegativeInt = 1
    train: bool = True


class RunSpec(Section):
    """A whole run: the preset's sections merged with command-line overrides."""

    preset: str = "toy2d"
    seed: NonNegativeInt = 0
    runtime: RuntimeSpec = RuntimeSpec()
    data: DataSpec = DataSpec()
    net: NetSpec = MLPNetSpec()
    teacher: TeacherSpec = TeacherSpec()
    distill: DistillSpec = DistillSpec()
    sample: SampleSpec = SampleSpec()
    eval: EvalSpec = EvalSpec()
    bench: BenchSpec = BenchSpec()

    @model_validator(mode="after")
    def _net_fits_data(self) -> RunSpec:
        if self.data.is_toy != (self.net.kind == "mlp"):
            want = "mlp" if self.data.is_toy else "ncsnpp"
            raise ValueError(f"net.kind={self.net.kind!r} does not fit data.name="
                             f"{self.data.name!r}; use net.kind={want!r}")
        return self

    def net_config(self) -> dict[str, Any]:
        """The network description stored in checkpoints (plain JSON types)."""
        return self.net.model_dump(mode="json")

    def fingerprint(self, sections: tuple[str, ...]) -> str:
        """sha256 of the named sections with the resume-safe fields left out."""
        kept = {name: _without_resume_safe(self.model_dump(mode="json")[name]) for name in sections}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


# Fields a resumed run may change: how long it runs and how often it reports or saves.
RESUME_SAFE = {"duration_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
               "device"}


def _without_resume_safe(section: Any) -> Any:
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k not in RESUME_SAFE}
    return section


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any],
                     sections: tuple[str, ...]) -> list[str]:
    """Dotted names of fields that differ between two spec dumps, ignoring resume-safe ones."""
    out = []
    for name in sections:
        old, new = saved.get(name, {}), current.get(name, {})
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                out.append(name)
            continue
        for key in sorted(set(old) | set(new)):
            if key not in RESUME_SAFE and old.get(key) != new.get(key):
                out.append(f"{name}.{key}")
    return out


def describe_validation_error(exc: ValidationError) -> str:
    """One line per invalid field: `field: message (got value)`."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        # Drop the discriminator tag pydantic inserts for tagged unions (net.mlp.hidden).
        if len(loc) > 1 and loc[0] == "net" and loc[1] in ("mlp", "ncsnpp"):
            loc.pop(1)
        field = ".".join(loc) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling against `--dry-run` output"
        got = err.get("input")
        shown = "" if err["type"] in ("extra_forbidden", "value_error") or isinstance(
            got, dict) else f" (got {got!r})"
        lines.append(f"{field}: {msg}{shown}")
    return "\n".join(lines)


def build_spec(raw: dict[str, Any]) -> RunSpec:
    """Validate a merged dict into a RunSpec, raising SpecError with one line per field."""
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(describe_validation_error(exc)) from None
