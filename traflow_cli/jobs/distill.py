"""`traflow distill`: distillation of a teacher run into a few-step student, by the objective
spec.distill.method names (objectives/: traflow by default, ctm, lagrangian, eulerian).

One step (`build_distill_step`'s `step_fn`), top to bottom; every random draw derives from
(seed, step), so a resumed run repeats exactly the steps an uninterrupted one takes:
1. reseed dropout from (seed, rank, step); draw the step's times on the teacher's grid
   (t, u, s, the chord time r and s_vel, the anchor time) for the global batch, keep this rank's rows;
2. noise: rows of the trajectory cache (with their teacher trajectories and classes), or fresh
   noise (and classes drawn uniformly for a class-conditional teacher), one draw for every
   `draws_per_solve` rows, which then share its teacher solve; data when a term reads it;
3-4. the objective's loss on the batch (objectives/): the teacher's side without gradient (its
   trajectory on the grid, solved now unless cached, and the targets), then the student's terms;
5. backward, then the optimiser step (learning-rate warm-up, gradient clipping), then the
   target EMA G^- and the evaluation EMA.
`traflow bench` times this same step function (jobs/bench.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from traflow_cli.engine.checkpoint import latest_checkpoint
from traflow_cli.engine.distributed import all_mean, gather_shards, rank, shard, unwrap, wrap_ddp
from traflow_cli.engine.ema import make_ema, update_ema
from traflow_cli.engine.progress import ProgressBar
from traflow_cli.engine.records import atomic_write_bytes
from traflow_cli.engine.runtime import Runtime
from traflow_cli.errors import one_line, writing
from traflow_cli.flow import evals_on_grid, solve_on_grid
from traflow_cli.grids import SigmaRange, resolve_grid, teacher_grid
from traflow_cli.jobs.batches import BatchSource, global_normal, make_batch_source
from traflow_cli.jobs.common import (
    RunClaim,
    claim_run_dir,
    make_optimizer,
    net_metadata,
    optimizer_step,
    rank_rows,
    run_training,
    runtime_for,
    sample_shape,
)
from traflow_cli.models import Teacher, load_teacher
from traflow_cli.nets import student_from_teacher
from traflow_cli.objectives import OBJECTIVES, Batch
from traflow_cli.objectives.shared import draw_times, start_state, trajectory_from_noise
from traflow_cli.objectives.traflow import TraFlowConfig
from traflow_cli.sampling import teacher_stepper, teacher_velocity
from traflow_cli.seeding import derive_seed, dropout_seed, generator_for
from traflow_cli.specs import (
    METHOD_SECTIONS,
    DistillSpec,
    RunSpec,
    SpecError,
    TraFlowSpec,
    check_teacher_run,
)

log = logging.getLogger("traflow")

SECTIONS = ("seed", "data", "net", "distill")


def traflow_config(section: DistillSpec) -> TraFlowConfig:
    """TraFlow's config: each TraFlowConfig field, by name, from distill.traflow or (the engine's
    choices: teacher stepper, start, distance, derivative, time draw) from distill itself. The
    spec defines each with the same default; tests/test_traflow.py checks it."""
    own = traflow_section(section)
    return TraFlowConfig(**{f.name: getattr(own if f.name in TraFlowSpec.model_fields else section, f.name)
                            for f in dataclasses.fields(TraFlowConfig)})


def method_section(section: DistillSpec) -> Any:
    """The chosen method's own section (its defaults where a spec copy skipped validation)."""
    return getattr(section, section.method) or METHOD_SECTIONS[section.method]()


def traflow_section(section: DistillSpec) -> TraFlowSpec:
    """TraFlow's settings: the section when TraFlow is chosen, its defaults otherwise."""
    return method_section(section) if section.method == "traflow" else TraFlowSpec()


def objective_config(section: DistillSpec, *, teacher_solver: str, derivative: str) -> Any:
    """The chosen method's config (objectives/): its section's fields, with the engine's teacher
    stepper and the runtime's derivative wherever the method has such a field."""
    engine = {"teacher_solver": teacher_solver, "derivative": derivative}
    if section.method == "traflow":
        return dataclasses.replace(traflow_config(section), **engine)
    config_class = OBJECTIVES[section.method][0]
    names = {f.name for f in dataclasses.fields(config_class)}
    shared = {name: getattr(section, name) for name in ("distance", "huber_c", "fd_step")}
    fields = {**shared, **method_section(section).model_dump(), **engine}
    return config_class(**{name: value for name, value in fields.items() if name in names})


def reads_data(section: DistillSpec) -> bool:
    """Whether the chosen objective reads a data batch each step."""
    if section.method == "traflow":
        return section.start == "data" or method_section(section).w_fm > 0
    return section.method == "ctm" and method_section(section).w_dsm > 0


def diagonal_fraction(section: DistillSpec) -> float:
    """The fraction of rows the time draw puts on the diagonal s = r (two-time methods)."""
    return float(getattr(method_section(section), "diagonal", 0.0))


def distill_grid(section: DistillSpec, native_grid: str, sigma_range: SigmaRange,
                 device: torch.device | str = "cpu") -> Tensor:
    """The teacher's time grid tau_0 < ... < tau_N = 1 [N + 1]: uniform in t from 0 for a
    rectified flow; for an EDM teacher it starts at t_min = 1 / (1 + sigma_max), and "karras"
    spaces it as EDM's sampler does."""
    return teacher_grid(resolve_grid(section.time_grid, native_grid), section.grid_steps,
                        sigma_range, device=device)


def open_teacher(spec: RunSpec) -> Teacher:
    """The teacher run of spec.distill.teacher, read once (record, checkpoint, weights). The
    spec's network must be the teacher's: the student copies it (the CLI puts the teacher's
    network into the spec before validation; this catches any other caller)."""
    check_teacher_run(spec.distill.teacher)
    teacher = load_teacher(spec.distill.teacher)
    config, wanted = teacher.config, spec.net_config()
    if config != wanted:
        differ = sorted(k for k in set(config) | set(wanted) if config.get(k) != wanted.get(k))
        raise SpecError(f"net: differs from the teacher's network in {spec.distill.teacher} "
                        f"({', '.join(f'net.{k}' for k in differ[:4])}); the student takes its "
                        "teacher's network: resolve the spec with the teacher's net section")
    return teacher  # load_teacher refused non-finite weights


def check_same_teacher(run_dir: Path, teacher: Teacher, teacher_dir: str | None,
                       field: str = "distill.teacher") -> None:
    """A resumed student must keep its teacher: the weights' digest it recorded at its last
    checkpoint against the teacher folder's now (runs from before the digest pass)."""
    ckpt = latest_checkpoint(run_dir / "checkpoints", warn=False)  # the restore warns
    recorded = None if ckpt is None else ckpt.metadata.get("teacher_sha256")
    if recorded is not None and recorded != teacher.sha256:
        raise SpecError(f"{field}: the weights in {teacher_dir} are not the ones {run_dir} "
                        f"was made from (sha256 {str(teacher.sha256)[:12]}..., recorded "
                        f"{recorded[:12]}...); restore that teacher, or choose another --out")


def teacher_trajectories(teacher: Any, shape: tuple[int, ...], *, count: int, seed: int,
                         grid: Tensor, solver: str, device: torch.device,
                         cache_file: Path | None, batch: int = 4096, num_classes: int = 0,
                         teacher_sha256: str | None = None, ends_only: bool = False
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
    """A bank of `count` noises, their teacher trajectories [N + 1, count, ...] on `grid` and,
    for a class-conditional teacher, the class [count] each was solved for; kept on disk at
    `cache_file` (None: in memory only, as the bench uses it).

    Paying the teacher's solve once and reusing it every step is what makes data-free
    distillation cheap (METHOD.md, "Cost per step"). The file records what it was solved for
    and a digest of its tensors: a damaged or stale one is solved again, with a warning.
    `ends_only` keeps the last state alone ([1, count, ...]: reflow's pairs).
    """
    key = {"count": count, "seed": seed, "shape": list(shape), "solver": solver,
           "num_classes": num_classes, "grid": [float(v) for v in grid.cpu().double()],
           "teacher_sha256": teacher_sha256, "ends_only": ends_only}
    if cache_file is not None and cache_file.is_file():
        saved, problem = _read_cache(cache_file, key)
        if saved is not None:
            labels = saved["labels"].to(device) if "labels" in saved else None
            return saved["noise"].to(device), saved["trajectory"].to(device), labels
        if rank() == 0:
            log.warning("%s %s; solving the teacher's trajectories again", cache_file, problem)
    noise = torch.randn((count, *shape), generator=generator_for(seed, 3)).to(device)
    labels = (torch.randint(num_classes, (count,), generator=generator_for(seed, 3, 1)).to(device)
              if num_classes else None)
    # Under DDP each rank solves its share of the rows, then every rank gets all of them.
    mine = shard(count)
    def solve(velocity: Any, chunk: Tensor) -> Tensor:
        if ends_only:  # the end alone: no state of the solve is kept
            return solve_on_grid(velocity, start_state(chunk, grid[0]), grid, method=solver)[None]
        return trajectory_from_noise(velocity, chunk, grid, solver)

    chunks = noise[mine].split(batch)
    # The solve can take many minutes before the first step: its own progress line, counted
    # in images through the teacher (a chunk's rows per evaluation, so a short last chunk
    # counts as what it is).
    per_row = evals_on_grid(solver, grid)
    with ProgressBar("teacher solves", len(noise[mine]) * per_row, unit="evaluation",
                     enabled=rank() == 0) as bar:
        done = 0

        def counted(velocity: Any) -> Any:
            def call(x: Tensor, t: Tensor) -> Tensor:
                nonlocal done
                out = velocity(x, t)
                done += len(x)
                bar.update(done)
                return out
            return call

        parts = []
        for start, chunk in zip(range(0, count, batch), chunks, strict=False):
            chunk_labels = None if labels is None else labels[mine][start:start + batch]
            parts.append(solve(counted(teacher_velocity(teacher, chunk_labels)), chunk))
    empty = noise.new_empty((1 if ends_only else len(grid), 0, *shape))
    trajectory = gather_shards(torch.cat(parts or [empty], dim=1), count, dim=1)
    if rank() == 0 and cache_file is not None:
        arrays = {"noise": noise.cpu().contiguous(), "trajectory": trajectory.cpu().contiguous()}
        if labels is not None:
            arrays["labels"] = labels.cpu().contiguous()
        atomic_write_bytes(cache_file, save(arrays, metadata={
            "key": json.dumps(key, sort_keys=True), "sha256": _tensor_digest(arrays)}))
    return noise, trajectory, labels


def _tensor_digest(arrays: dict[str, Tensor]) -> str:
    """sha256 over the tensors' names, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        tensor = arrays[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _read_cache(path: Path, key: dict[str, Any]) -> tuple[dict[str, Tensor] | None, str]:
    """The cached arrays if the file is whole and was solved for `key`; else (None, why not)."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # noqa: BLE001 - any failure to parse means: solve again
        return None, f"is unreadable ({one_line(err)})"
    if "sha256" not in metadata or "key" not in metadata:
        return None, "records no digest (written by an older traflow)"
    if _tensor_digest(arrays) != metadata["sha256"]:
        return None, "is damaged (its tensors do not match their digest)"
    if json.loads(metadata["key"]) != key:
        return None, "was solved for other settings (teacher, grid, solver, count or seed)"
    steps, shape = 1 if key["ends_only"] else len(key["grid"]), [key["count"], *key["shape"]]
    shapes = {name: list(value.shape) for name, value in arrays.items()}
    wanted = {"noise": shape, "trajectory": [steps, *shape],
              **({"labels": shape[:1]} if key["num_classes"] else {})}
    if shapes != wanted:
        return None, f"holds tensors of other shapes ({shapes}, expected {wanted})"
    return arrays, ""


def velocity_derivative(section: DistillSpec, runtime: Runtime, dropout: float = 0.0) -> str:
    """"jvp" or "fd", the spec's choice for this runtime: a central difference needs full float32
    (bf16 and TF32 round the difference of two jumps 2 x fd_step apart to noise) and a student
    without dropout (each of its passes draws its own mask, and dividing by 2 x fd_step
    magnifies the masks' difference some 5,000 times)."""
    rounds = runtime.amp_dtype is not None or runtime.tf32
    if section.derivative == "auto":
        return "jvp" if rounds or dropout > 0 else "fd"
    differentiates = section.method in ("lagrangian", "eulerian") or (
        section.method == "traflow" and method_section(section).w_vel > 0)
    if section.derivative == "fd" and differentiates and rounds:
        raise SpecError("distill.derivative: 'fd' differences two jumps 2 x fd_step apart, which "
                        "bf16 and TF32 round to noise; set runtime.precision=fp32 and "
                        "runtime.tf32=false, or use distill.derivative=jvp (or auto)")
    if section.derivative == "fd" and differentiates and dropout > 0:
        raise SpecError(f"distill.derivative: 'fd' differences two passes of a student with "
                        f"dropout {dropout:g}, whose masks differ; set net.dropout=0 or use "
                        "distill.derivative=jvp (or auto)")
    return section.derivative


def reads_data_labels(spec: RunSpec) -> bool:
    """Whether the classes of a batch come from the data: a class-conditional teacher, labelled
    data, and a term that reads the data. Otherwise each solve draws its class uniformly."""
    cfg = spec.distill
    return (reads_data(cfg) and spec.data.use_labels
            and spec.net_config().get("num_classes", 0) > 0)


def cache_allowed(spec: RunSpec) -> bool:
    """Whether the spec's loss can read cached teacher solves (data-free, no data labels)."""
    return spec.distill.start == "teacher" and not reads_data_labels(spec)


@dataclass
class DistillStep:
    """One distillation step and what it updates: what the job's loop runs and the bench times."""

    student: nn.Module     # the trained weights (plain module; DDP/compile wrap it inside step_fn)
    target: nn.Module      # G^-: the target EMA
    ema: nn.Module         # the evaluation EMA
    teacher: nn.Module     # the teacher network (eager)
    optimizer: torch.optim.Optimizer
    step_fn: Callable[[int], dict[str, Tensor]]
    teacher_solve: str     # "cached" or "per step"
    derivative: str        # how L_vel's dG/ds is taken here: "jvp" or "fd"
    draws_per_solve: int   # rows per teacher solve here (1 with a cache: no solve in the step)
    method: str = "traflow"  # the objective (objectives/)

    @property
    def saved_modules(self) -> dict[str, nn.Module]:
        return {"net": self.student, "target": self.target, "ema": self.ema}


def build_distill_step(spec: RunSpec, runtime: Runtime, teacher_net: nn.Module, *,
                       cache_file: Path | None, batches: BatchSource | None = None,
                       inputs_checked: Callable[[], None] | None = None,
                       native_grid: str = "uniform", teacher_sha256: str | None = None
                       ) -> DistillStep:
    """The student, its EMAs, its optimiser and `step_fn(step)` for a spec whose `net` section
    is the teacher's (check_teacher_net); `teacher_net` is on the runtime's device. `cache_file`
    keeps a trajectory cache on disk; `batches` replaces the spec's data source;
    `inputs_checked` is called once everything but the (long) teacher solves has been checked;
    `native_grid` is the teacher run's own grid ("karras" for EDM imports); `teacher_sha256`
    names the teacher's weights in the trajectory cache's key."""
    cfg = spec.distill
    sigma_range: SigmaRange = teacher_net.sigma_range  # an EDM teacher's; None for a rectified flow
    # Heun on an EDM teacher steps in EDM's coordinates (x / t against sigma), as its sampler.
    solver = teacher_stepper(cfg.teacher_solver, sigma_range)
    config = spec.net_config()
    derivative = velocity_derivative(cfg, runtime, float(config.get("dropout", 0.0)))
    objective, diagonal = OBJECTIVES[cfg.method][1], diagonal_fraction(cfg)
    method_config = objective_config(cfg, teacher_solver=solver, derivative=derivative)
    torch.manual_seed(derive_seed(spec.seed, 5))  # the s branch's initial weights
    student = runtime.place(student_from_teacher(teacher_net, config))
    target = make_ema(student)   # G^-: the target EMA (mu = target_ema)
    ema = make_ema(student)      # the weights to sample with (mu = ema_decay)
    params = list(student.parameters())
    optimizer = make_optimizer(params, cfg, runtime)
    model = runtime.maybe_compile(wrap_ddp(student, runtime.device))
    teacher = runtime.maybe_compile(teacher_net)
    last_layer = unwrap(student).output_layer.weight
    rows = rank_rows(cfg.batch_size, runtime)
    # Rows per teacher solve, when it is solved every step (the spec refuses it with a cache).
    share = 1 if cfg.trajectory_cache else cfg.draws_per_solve
    if runtime.world_size > 1 and (rows.stop - rows.start) % share:
        raise SpecError(f"distill.draws_per_solve: {share} must divide each process's share of "
                        f"the batch ({rows.stop - rows.start} rows); choose a divisor of it")
    solve_rows = slice(rows.start // share, rows.stop // share)  # this rank's shared solves
    # TraFlow's speed option: L_vel on every vel_every-th row (its default 1 for other methods).
    vel_every = traflow_section(cfg).vel_every
    if runtime.world_size > 1 and (rows.stop - rows.start) % vel_every:
        raise SpecError(f"distill.traflow.vel_every: {vel_every} must divide each process's share of "
                        f"the batch ({rows.stop - rows.start} rows), so that every process has as "
                        "many L_vel rows; choose a divisor of it")
    shape = sample_shape(config)
    grid = distill_grid(cfg, native_grid, sigma_range, runtime.device)
    grid_host = grid.cpu()  # the time draw reads grid[0] on the host: no device sync per step
    needs_data = reads_data(cfg)
    if needs_data and batches is None:
        batches = make_batch_source(spec.data, seed=spec.seed, global_batch=cfg.batch_size,
                                    runtime=runtime, net_classes=config.get("num_classes", 0))
    # A class-conditional teacher needs a class for every solve: the data's labels when the
    # loss reads data, else classes drawn uniformly (data-free), stored with any cached solve.
    num_classes = config.get("num_classes", 0)
    data_labels = reads_data_labels(spec)
    if data_labels and cfg.trajectory_cache:
        raise SpecError("distill.trajectory_cache: cached solves carry their own classes, which "
                        "the data's labels would contradict; set distill.trajectory_cache=0 or "
                        "data.use_labels=false")
    if inputs_checked is not None:  # the teacher loaded, the data opened, the student built
        inputs_checked()
    bank = None
    if cfg.trajectory_cache:
        bank = teacher_trajectories(teacher, shape, count=cfg.trajectory_cache, seed=spec.seed,
                                    grid=grid, solver=solver, device=runtime.device,
                                    num_classes=num_classes, cache_file=cache_file,
                                    teacher_sha256=teacher_sha256)

    def step_fn(step: int) -> dict[str, Tensor]:
        torch.manual_seed(dropout_seed(spec.seed, runtime.rank, step))
        gen = generator_for(spec.seed, 0, step, device=runtime.device)
        # The jitter has its own stream: grid and jittered runs draw the same noise and pairs.
        times = draw_times(grid_host, cfg.batch_size, gen, vel_every=vel_every,
                           jittered=cfg.consistency_times == "jittered",
                           jitter_generator=generator_for(spec.seed, 9, step,
                                                          device=runtime.device),
                           diagonal=diagonal,
                           diagonal_generator=generator_for(spec.seed, 10, step,
                                                            device=runtime.device)).rows(rows)
        trajectory = labels = None
        if bank is not None:
            pick = torch.randint(len(bank[0]), (cfg.batch_size,), generator=gen,
                                 device=gen.device)[rows].to(runtime.device)
            noise, trajectory = bank[0][pick], bank[1][:, pick]
            labels = None if bank[2] is None else bank[2][pick]
        else:
            solves = cfg.batch_size // share
            noise = runtime.place_batch(global_normal(shape, solves, solve_rows, gen))
            if num_classes and not data_labels:
                labels = torch.randint(num_classes, (solves,), generator=gen,
                                       device=gen.device)[solve_rows].to(runtime.device)
        data, batch_labels = batches(step) if needs_data else (None, None)
        if data_labels:
            labels = batch_labels
        with runtime.autocast():
            if share > 1:  # one solve per noise, read by its `share` rows as a cached one is
                trajectory = trajectory_from_noise(teacher_velocity(teacher, labels), noise, grid,
                                                   solver).repeat_interleave(share, 1)
                noise = runtime.place_batch(noise.repeat_interleave(share, dim=0))
                labels = None if labels is None else labels.repeat_interleave(share)
            loss = objective(Batch(student=model, online=student, target=target,
                                   teacher=teacher_velocity(teacher, labels), noise=noise,
                                   grid=grid, times=times, trajectory=trajectory, data=data,
                                   labels=labels, last_layer=last_layer, grad_mean=all_mean,
                                   step=step),
                             method_config)
        loss.backward()
        grad_norm = optimizer_step(optimizer, params, step, cfg)
        update_ema(target, student, cfg.target_ema)
        update_ema(ema, student, cfg.ema_decay)
        return {"loss": loss.total.detach(), "grad_norm": grad_norm,
                **{f"loss_{name}" if name != "lambda_vel" else name: value
                   for name, value in loss.terms.items()}}

    return DistillStep(student=student, target=target, ema=ema, teacher=teacher_net,
                       optimizer=optimizer, step_fn=step_fn,
                       teacher_solve="cached" if bank is not None else "per step",
                       derivative=derivative, draws_per_solve=share, method=cfg.method)


def trajectory_cache_path(section: DistillSpec, run_dir: Path) -> Path:
    """The trajectory cache's file: distill.trajectory_cache_file (its folder made), or the run
    folder's own."""
    if section.trajectory_cache_file is None:
        return run_dir / "teacher_trajectories.safetensors"
    path = Path(section.trajectory_cache_file).expanduser()
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def distill(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """Distill spec.distill.teacher into a student; resumes from run_dir if started."""
    teacher = open_teacher(spec)
    runtime = runtime_for(spec)
    with claim_run_dir(run_dir, spec, job="distill", sections=SECTIONS, runtime=runtime) as claim:
        return _distill(spec, claim, runtime, teacher)


def _distill(spec: RunSpec, claim: RunClaim, runtime: Runtime, teacher: Teacher
             ) -> dict[str, Any]:
    cfg = spec.distill
    if claim.resumed:
        check_same_teacher(claim.run_dir, teacher, cfg.teacher)
    step = build_distill_step(spec, runtime, runtime.place(teacher.net),
                              cache_file=trajectory_cache_path(cfg, claim.run_dir),
                              inputs_checked=claim.write_record, native_grid=teacher.native_grid,
                              teacher_sha256=teacher.sha256)
    metadata = net_metadata(spec.net_config(), "student", teacher=str(cfg.teacher),
                            teacher_sha256=teacher.sha256 or "",
                            time_grid=resolve_grid(cfg.time_grid, teacher.native_grid),
                            grid_steps=cfg.grid_steps)
    return run_training("distill", claim, runtime, cfg, step, metadata)
