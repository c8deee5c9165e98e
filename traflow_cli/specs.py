"""Pydantic run specs: one validated description of a run, saved beside its outputs.

No torch here, so --help, --dry-run and spec errors are instant. Every section forbids unknown
keys, so a typo in a preset or a --set override fails before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from traflow_cli.errors import UserError
from traflow_cli.runfolder import require_run
from traflow_cli.times import check_sampling_times

TOY_DATASETS = ("checkerboard", "ring8")
IMAGE_DATASETS = ("cifar10", "celeba64", "ffhq64", "afhqv2-64", "imagenet64", "shapes32",
                  "folder")

# Strict numbers: `batch_size = true` is not 1 and `hflip = 1` is not true. Floats accept
# integers (lr = 1) but never booleans; non-finite values are refused by Section's config.
PositiveInt = Annotated[int, Field(strict=True, gt=0)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
PositiveFloat = Annotated[float, Field(strict=True, gt=0)]
NonNegativeFloat = Annotated[float, Field(strict=True, ge=0)]
Unit = Annotated[float, Field(strict=True, ge=0.0, lt=1.0)]
Flag = Annotated[bool, Field(strict=True)]
# Upper bounds where a larger value would only allocate or loop without end (a batch of 1e9,
# --nfe 99999999999999999999): refused at validation, one line naming the field.
MAX_BATCH = 1 << 20
MAX_EVALS = 10_000  # student jumps per sample
MAX_SOLVER_STEPS = 100_000  # teacher ODE steps per sample
MAX_SAMPLES = 100_000_000
BatchSize = Annotated[int, Field(strict=True, gt=0, le=MAX_BATCH)]
Evals = Annotated[int, Field(strict=True, gt=0, le=MAX_EVALS)]
SolverSteps = Annotated[int, Field(strict=True, gt=0, le=MAX_SOLVER_STEPS)]
OnOff = Literal["auto", "on", "off"]


class SpecError(UserError, ValueError):
    """A spec that cannot run; the message is one line naming the field and the fix."""


class Section(BaseModel):
    # allow_inf_nan=False: `lr = inf` or `times = [0, nan, 1]` fail here, not as NaN losses later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RuntimeSpec(Section):
    """Where and how tensors run; "auto" turns a speed option on only where it is safe (CUDA)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: OnOff = "auto"
    channels_last: OnOff = "auto"
    cuda_graphs: OnOff = "auto"
    tf32: Flag = True


class DataSpec(Section):
    """Training data: an exact toy distribution or an image dataset in [-1, 1]."""

    name: Literal["checkerboard", "ring8", "cifar10", "celeba64", "ffhq64", "afhqv2-64", "imagenet64",
                  "shapes32", "folder"] = "ring8"
    path: str | None = None
    resolution: PositiveInt = 32
    channels: PositiveInt = 3
    hflip: Flag = False
    use_labels: Flag = False
    download: Flag = False
    preload: Flag = True

    @property
    def is_toy(self) -> bool:
        return is_toy_data(self)


def is_toy_data(data: DataSpec | dict[str, Any] | Any) -> bool:
    """The one toy-vs-image rule: the data section names an exact 2-D distribution
    (TOY_DATASETS), not images. Takes a validated DataSpec or a raw `data` section as a preset
    or --set gives it, before validation (a missing name is the default's; a section that is
    not a table counts as the default too: validation reports it)."""
    if isinstance(data, DataSpec):
        name = data.name
    else:
        name = data.get("name") if isinstance(data, dict) else None
    return (DataSpec.model_fields["name"].default if name is None else name) in TOY_DATASETS


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


class SongUNetSpec(Section):
    """NVlabs/edm's SongUNet: DDPM++ (positional, standard, [1, 1]) or NCSN++ (fourier,
    channel_mult_noise 2, residual, [1, 3, 3, 1]); defaults are EDM's."""

    type: Literal["SongUNet"] = "SongUNet"
    augment_dim: NonNegativeInt = 0
    model_channels: PositiveInt = 128
    channel_mult: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 2, 2, 2]
    channel_mult_emb: PositiveInt = 4
    num_blocks: PositiveInt = 4
    attn_resolutions: list[PositiveInt] = [16]
    dropout: Unit = 0.10
    label_dropout: Unit = 0.0
    embedding_type: Literal["positional", "fourier"] = "positional"
    channel_mult_noise: PositiveInt = 1
    encoder_type: Literal["standard", "skip", "residual"] = "standard"
    decoder_type: Literal["standard", "skip"] = "standard"
    resample_filter: Annotated[list[PositiveFloat], Field(min_length=1)] = [1, 1]


class DhariwalUNetSpec(Section):
    """NVlabs/edm's DhariwalUNet (ADM); defaults are the official ImageNet-64 network's."""

    type: Literal["DhariwalUNet"] = "DhariwalUNet"
    augment_dim: NonNegativeInt = 0
    model_channels: PositiveInt = 192
    channel_mult: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 2, 3, 4]
    channel_mult_emb: PositiveInt = 4
    num_blocks: PositiveInt = 3
    attn_resolutions: list[PositiveInt] = [32, 16, 8]
    dropout: Unit = 0.10
    label_dropout: Unit = 0.0


class EDMPrecondSpec(Section):
    """EDMPrecond; sigma_max null means no upper limit (EDM's default, infinity)."""

    kind: Literal["edm"] = "edm"
    sigma_data: PositiveFloat = 0.5
    sigma_min: NonNegativeFloat = 0.0
    sigma_max: PositiveFloat | None = None


class VPPrecondSpec(Section):
    """VPPrecond: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) on [epsilon_t, 1]."""

    kind: Literal["vp"] = "vp"
    beta_d: PositiveFloat = 19.9
    beta_min: NonNegativeFloat = 0.1
    M: Annotated[int, Field(ge=2)] = 1000
    epsilon_t: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5


class VEPrecondSpec(Section):
    """VEPrecond: noise levels sigma_min .. sigma_max."""

    kind: Literal["ve"] = "ve"
    sigma_min: PositiveFloat = 0.02
    sigma_max: PositiveFloat = 100.0


class EDMNetSpec(Section):
    """An NVlabs/edm network (written by `traflow teacher import edm`): a preconditioning around
    a U-Net, run as a rectified-flow velocity (nets/edm.py). num_classes is EDM's label_dim."""

    kind: Literal["edm"] = "edm"
    image_size: PositiveInt = 32
    in_channels: PositiveInt = 3
    num_classes: NonNegativeInt = 0
    precond: Annotated[EDMPrecondSpec | VPPrecondSpec | VEPrecondSpec,
                       Field(discriminator="kind")] = EDMPrecondSpec()
    model: Annotated[SongUNetSpec | DhariwalUNetSpec, Field(discriminator="type")] = SongUNetSpec()

    @model_validator(mode="before")
    @classmethod
    def _default_tags(cls, raw: Any) -> Any:
        # A section given without its tag (e.g. only --set net.model.dropout=0) takes the default.
        if isinstance(raw, dict):
            raw = dict(raw)
            for key, tag, default in (("model", "type", "SongUNet"), ("precond", "kind", "edm")):
                if isinstance(raw.get(key), dict) and tag not in raw[key]:
                    raw[key] = {tag: default, **raw[key]}
        return raw


NetSpec = Annotated[MLPNetSpec | NCSNppNetSpec | EDMNetSpec, Field(discriminator="kind")]
# Tags pydantic inserts in error locations for these tagged unions (net.edm.model.SongUNet...).
_UNION_TAGS = {"net": ("mlp", "ncsnpp", "edm"), "precond": ("edm", "vp", "ve"),
               "model": ("SongUNet", "DhariwalUNet")}


class TrainingSpec(Section):
    """Optimiser, duration and bookkeeping shared by teacher training and distillation."""

    batch_size: BatchSize = 512
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
    # A non-finite loss or gradient: "stop" the run with one line, keeping the last good
    # checkpoint (checked at log ticks and before every save: no per-step device sync), or
    # "skip" the update (a host sync per step), stopping after 20 bad steps in a row.
    nonfinite: Literal["stop", "skip"] = "stop"


class TeacherSpec(TrainingSpec):
    """Rectified-flow teacher training: E||v(x_t, t) - (data - noise)||^2, t ~ U[t_eps, 1]."""

    t_eps: Unit = 1e-3


class ReflowSpec(TeacherSpec):
    """2-rectified flow (METHOD.md, "reflow"): a new teacher trained from its parent's weights
    on pairs (noise, Phi(noise, 0 -> 1)) of the parent's ODE, x_t = t Phi + (1 - t) noise."""

    parent: str | None = None
    pairs: Annotated[int, Field(strict=True, gt=0, le=MAX_SAMPLES)] = 10_000  # solved once, reused
    solver: Literal["heun", "euler"] = "heun"
    solver_steps: SolverSteps = 100  # Phi's steps on a uniform grid: the pairs' accuracy


class TraFlowSpec(Section):
    """`distill.method = "traflow"` (the default): TraFlow's weights and target choices
    (objectives/traflow.py; names and defaults follow its TraFlowConfig)."""

    w_out: NonNegativeFloat = 1.0
    w_vel: NonNegativeFloat = 1.0
    w_sc: NonNegativeFloat = 1.0
    w_fm: NonNegativeFloat = 0.0
    lambda_vel: Literal["adaptive"] | PositiveFloat = "adaptive"
    lambda_clip: tuple[PositiveFloat, PositiveFloat] = (0.01, 10.0)
    # L_vel's target: the chord x_hat - noise, or the teacher's velocity where the jump lands.
    vel_target: Literal["chord", "tangent"] = "chord"
    # L_sc's inner jump by G^- ("target") or by the online weights under stop-gradient (CTM).
    sc_inner: Literal["target", "online"] = "target"
    # A speed option that changes the estimator: L_vel on every vel_every-th row only.
    vel_every: PositiveInt = 1

    @model_validator(mode="after")
    def _coherent(self) -> TraFlowSpec:
        if self.w_out == self.w_vel == self.w_sc == self.w_fm == 0:
            raise ValueError("every loss weight is 0; set at least one of w_out, w_vel, w_sc, "
                             "w_fm")
        if self.vel_target == "tangent" and self.w_vel > 0 and self.vel_every > 1:
            raise ValueError("vel_target='tangent' calls the teacher with the whole batch's "
                             "classes, so every row carries L_vel; set vel_every=1")
        if self.lambda_clip[0] > self.lambda_clip[1]:
            raise ValueError(f"lambda_clip must be (low, high) with low <= high, got "
                             f"{list(self.lambda_clip)}")
        return self


class CTMSpec(Section):
    """`distill.method = "ctm"`: consistency trajectory distillation (objectives/ctm.py)."""

    # The denoising anchor on real data (CTM's DSM); 0 makes CTM data-free.
    w_dsm: NonNegativeFloat = 1.0


class LagrangianSpec(Section):
    """`distill.method = "lagrangian"`: dG/ds = v(G, s) (objectives/lagrangian.py)."""

    # The fraction of rows with s = r, where the condition is u(x, r, r) = v(x, r).
    diagonal: Unit = 0.75


class EulerianSpec(Section):
    """`distill.method = "eulerian"`: MeanFlow's identity with the teacher (objectives/eulerian.py)."""

    diagonal: Unit = 0.75  # MeanFlow's best: 25% of rows with s != r
    adaptive_p: Annotated[float, Field(strict=True, ge=0.0, le=2.0)] = 1.0
    adaptive_c: PositiveFloat = 1e-3
    # Steps over which the target's d/dr u term ramps in from 0 (objectives/eulerian.py).
    tangent_warmup: NonNegativeInt = 0


# Each method's own section in `distill`, present only when that method is chosen.
METHOD_SECTIONS = {"traflow": TraFlowSpec, "ctm": CTMSpec, "lagrangian": LagrangianSpec,
                   "eulerian": EulerianSpec}
# TraFlow's fields as older specs (run folders' spec.json, presets, --set) put them: in distill.
TRAFLOW_FIELDS = tuple(TraFlowSpec.model_fields)


def move_traflow_fields(distill: dict[str, Any], *, keep: bool = False) -> dict[str, Any]:
    """A distill section with TraFlow's fields written the older way (flat in distill) moved
    into distill.traflow; under another method they were ignored, and are dropped (kept with
    `keep`, for a command that may choose TraFlow after all)."""
    flat = {k: distill[k] for k in TRAFLOW_FIELDS if k in distill}
    if not flat:
        return distill
    out = {k: v for k, v in distill.items() if k not in flat}
    if keep or out.get("method", "traflow") == "traflow":
        section = dict(out.get("traflow") or {})
        twice = sorted(set(section) & set(flat))
        if twice:
            raise ValueError(f"distill.{twice[0]} and distill.traflow.{twice[0]} are both set; "
                             f"keep one (distill.traflow.{twice[0]})")
        out["traflow"] = {**flat, **section}
    return out


class DistillSpec(TrainingSpec):
    """Distillation (METHOD.md): the engine's fields, TraFlow's (the default method; names follow
    objectives.traflow.TraFlowConfig), and the chosen method's section (derivative "auto" is
    resolved per runtime by jobs.distill.velocity_derivative)."""

    teacher: str | None = None
    # The objective: traflow (default), ctm, lagrangian or eulerian (objectives/); a method
    # other than traflow reads its own section, e.g. [distill.ctm], and none of TraFlow's weights.
    method: Literal["traflow", "ctm", "lagrangian", "eulerian"] = "traflow"
    traflow: TraFlowSpec | None = None
    ctm: CTMSpec | None = None
    lagrangian: LagrangianSpec | None = None
    eulerian: EulerianSpec | None = None
    grid_steps: SolverSteps = 18
    teacher_solver: Literal["heun", "euler"] = "heun"
    # The teacher's time grid: "native" is the teacher run's own ("karras" for EDM imports,
    # "uniform" for rectified flows); Heun on an EDM teacher steps in EDM's coordinates.
    time_grid: Literal["native", "uniform", "karras"] = "native"
    start: Literal["teacher", "data"] = "teacher"
    distance: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: PositiveFloat = 0.03
    # dG/ds for L_vel: forward mode ("jvp"), a central difference in s ("fd": float32 only), or
    # "auto": fd where the student runs in float32 without TF32 (the CPU), jvp elsewhere.
    derivative: Literal["jvp", "fd", "auto"] = "jvp"
    fd_step: PositiveFloat = 1e-4
    # Consistency times on the grid points (CTM's draw) or moved within their cells
    # ("jittered": continuous times, one extra teacher step from the nearest grid state).
    consistency_times: Literal["grid", "jittered"] = "grid"
    target_ema: Unit = 0.9999
    trajectory_cache: NonNegativeInt = 0
    # Where the cache lives: the run folder's own file (None), or a file several runs of one
    # teacher share (a sweep over methods or settings solves the teacher once). Every read
    # checks the file's key (teacher digest, grid, solver, count, seed) and its tensors' digest.
    trajectory_cache_file: str | None = None
    # Teacher solved every step (no cache): K consecutive rows share one noise and its solve,
    # each with its own time draw, so the step pays N Heun steps for B / K trajectories.
    draws_per_solve: PositiveInt = 1

    @model_validator(mode="before")
    @classmethod
    def _method_section(cls, raw: Any) -> Any:
        # The chosen method's section exists (with its defaults) even where no field of it is set.
        if not isinstance(raw, dict):
            return raw
        raw = move_traflow_fields(raw)
        method = raw.get("method", "traflow")
        if method in METHOD_SECTIONS and raw.get(method) is None:
            raw = {**raw, method: {}}
        return raw

    @model_validator(mode="after")
    def _coherent(self) -> DistillSpec:
        for name in METHOD_SECTIONS:
            if name != self.method and getattr(self, name) is not None:
                raise ValueError(f"distill.{name} is set but distill.method is {self.method!r}; "
                                 f"set distill.method={name}, or remove the [distill.{name}] "
                                 "section")
        if self.method != "traflow":
            if self.start != "teacher":
                raise ValueError(f"distill.start: method {self.method!r} starts from the "
                                 "teacher's trajectory from noise; set distill.start=teacher")
            if self.draws_per_solve > 1:
                raise ValueError(f"distill.draws_per_solve: method {self.method!r} takes one "
                                 "teacher solve per row; set distill.draws_per_solve=1")
            if self.method in ("lagrangian", "eulerian") and self.distance != "l2":
                # Their losses match velocities, which pseudo-Huber's image-scale c does not fit.
                raise ValueError(f"distill.distance: method {self.method!r} matches velocities "
                                 "by a squared error; set distill.distance=l2 (pseudo_huber is "
                                 "for traflow and ctm)")
        if self.start == "data" and self.trajectory_cache > 0:
            raise ValueError("trajectory_cache needs start='teacher' (cached solves start at noise)")
        if self.draws_per_solve > 1:
            if self.trajectory_cache > 0 or self.start == "data":
                raise ValueError("draws_per_solve shares the teacher's per-step solve from noise; "
                                 "set it to 1 with a trajectory_cache or start='data'")
            if self.batch_size % self.draws_per_solve:
                raise ValueError(f"draws_per_solve ({self.draws_per_solve}) must divide batch_size "
                                 f"({self.batch_size})")
        if self.start == "data" and self.consistency_times == "jittered":
            raise ValueError("consistency_times='jittered' steps from the teacher's trajectory "
                             "from noise; set start='teacher' or consistency_times='grid'")
        traflow = self.traflow
        if self.start == "data" and traflow and traflow.vel_target == "tangent" and \
                traflow.w_vel > 0:
            raise ValueError("traflow.vel_target='tangent' steps from the teacher's trajectory "
                             "from noise; set start='teacher' or traflow.vel_target='chord'")
        return self


def check_teacher_run(path: str | None, flag: str = "distill.teacher") -> dict[str, Any]:
    """The distill job's precondition, checked before any work (not at validation: a finished
    student's spec stays loadable after its teacher folder has moved). Returns its record."""
    if path is None:
        raise SpecError(f"{flag}: required; pass --teacher RUN_DIR (a teacher run folder)")
    return require_run(Path(path), flag, jobs=("teacher",))


class SampleSpec(Section):
    """What `traflow sample` writes. Teacher runs use `solver`; students use `nfe`/`times`."""

    nfe: Evals = 1
    num_samples: Annotated[int, Field(strict=True, gt=0, le=MAX_SAMPLES)] = 10_000
    batch_size: BatchSize = 500
    times: list[Annotated[float, Field(strict=True)]] | None = None
    gamma: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] = 0.0
    solver: Literal["euler", "heun", "rk45"] = "euler"
    steps: SolverSteps = 100
    # Teacher: the grid its solver steps on; student: where its nfe jumps land. "native" is the
    # run's own (an EDM teacher's Karras grid; the grid a student was distilled on).
    time_grid: Literal["native", "uniform", "karras"] = "native"
    rtol: PositiveFloat = 1e-5
    atol: PositiveFloat = 1e-5
    format: Literal["png", "npz", "both"] = "png"
    class_label: NonNegativeInt | None = None
    # Write grid.png (the first 64 samples); unrelated to time_grid.
    write_grid: Flag = True

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, raw: Any) -> Any:
        # Specs recorded before the rename (run folders' spec.json) call write_grid `grid`.
        if isinstance(raw, dict) and "grid" in raw:
            raw = dict(raw)
            old = raw.pop("grid")
            raw.setdefault("write_grid", old)
        return raw

    @model_validator(mode="after")
    def _times_match_nfe(self) -> SampleSpec:
        if self.times is not None:
            check_sampling_times(self.times, self.nfe)
        return self


class EvalSpec(Section):
    """Toy distances and image metrics: what `traflow eval` measures by default."""

    # Toy distances hold [num_samples, projections] float64 twice and mmd_samples^2 kernels.
    num_samples: Annotated[int, Field(strict=True, gt=0, le=1_000_000)] = 10_000
    student_nfe: list[Evals] = [1, 2, 4]
    teacher_steps: list[SolverSteps] = [1, 2, 4, 100]
    projections: Annotated[int, Field(strict=True, gt=0, le=10_000)] = 1000
    mmd_samples: Annotated[int, Field(strict=True, gt=0, le=10_000)] = 4000
    fid_mode: Literal["legacy_tensorflow", "clean", "legacy_pytorch"] = "legacy_tensorflow"
    fid_reference: str | None = None
    fid_split: Literal["train", "test"] = "train"


class BenchSpec(Section):
    """Throughput and latency measured by `traflow bench`."""

    batch_size: BatchSize = 256
    student_nfe: list[Evals] = [1, 2, 4]
    teacher_steps: list[SolverSteps] = [1, 10, 100]
    rk45: Flag = True
    repeats: PositiveInt = 5
    warmup: NonNegativeInt = 1
    train: Flag = True


class RunSpec(Section):
    """A whole run: the preset's sections merged with command-line overrides."""

    preset: str = "toy2d"
    seed: NonNegativeInt = 0
    runtime: RuntimeSpec = RuntimeSpec()
    data: DataSpec = DataSpec()
    net: NetSpec = MLPNetSpec()
    teacher: TeacherSpec = TeacherSpec()
    distill: DistillSpec = DistillSpec()
    reflow: ReflowSpec = ReflowSpec()
    sample: SampleSpec = SampleSpec()
    eval: EvalSpec = EvalSpec()
    bench: BenchSpec = BenchSpec()

    @model_validator(mode="after")
    def _net_fits_data(self) -> RunSpec:
        if self.data.is_toy != (self.net.kind == "mlp"):
            want = "mlp" if self.data.is_toy else "an image network (e.g. ncsnpp)"
            raise ValueError(f"net.kind={self.net.kind!r} does not fit data.name="
                             f"{self.data.name!r}; use net.kind={want!r}, or a preset made for "
                             "this network")
        size = getattr(self.net, "image_size", None)
        if size is not None and size != self.data.resolution:
            raise ValueError(f"net.image_size={size} does not match data.resolution="
                             f"{self.data.resolution}; set both to the same size")
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
               "device", "nonfinite", "trajectory_cache_file"}


def _without_resume_safe(section: Any) -> Any:
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k not in RESUME_SAFE}
    return section


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any],
                     sections: tuple[str, ...]) -> list[str]:
    """Dotted names of fields that differ between two spec dumps, ignoring resume-safe ones.

    A field the saved spec lacks (a run started by an older traflow) agrees with a current value
    that is that field's default: the older version behaved as the default does.
    """
    defaults = RunSpec().model_dump(mode="json")
    # distill's method sections compare field by field, each with its own defaults.
    defaults["distill"].update({name: section().model_dump(mode="json")
                                for name, section in METHOD_SECTIONS.items()})
    out = []
    for name in sections:
        old, new = saved.get(name, {}), current.get(name, {})
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                out.append(name)
            continue
        if name == "distill":
            old = move_traflow_fields(old)  # a run started before TraFlow had its own section
        default = defaults.get(name, {}) if old.get("kind", new.get("kind")) == new.get("kind") else {}
        old, new, default = _flat(old), _flat(new), _flat(default)
        for key in sorted(set(old) | set(new)):
            before = old[key] if key in old else default.get(key, _MISSING)
            if key not in RESUME_SAFE and before != new.get(key, _MISSING):
                out.append(f"{name}.{key}")
    return out


_MISSING = object()


def _flat(section: dict[str, Any]) -> dict[str, Any]:
    """One level of nested sections as dotted keys (distill.ctm.w_dsm); a section that is None
    (a method not chosen) has no keys."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update({f"{key}.{sub}": v for sub, v in value.items()})
        elif value is not None or key not in METHOD_SECTIONS:
            out[key] = value
    return out


def describe_validation_error(exc: ValidationError) -> str:
    """One line per invalid field: `field: message (got value)`."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        # Drop the discriminator tags pydantic inserts for tagged unions (net.mlp.hidden).
        if loc and loc[0] == "net":
            loc = [part for i, part in enumerate(loc)
                   if i == 0 or part not in _UNION_TAGS.get(loc[i - 1], ())]
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
