"""`traflow sample`: samples from a teacher (ODE) or a student (any NFE), resumable.

An image run folder (--out) holds:
  images/000000.png ...  one lossless PNG per sample: the store a resumed run fills in
  samples.npz            with --format npz|both: `images` [N, H, W, C] uint8 (NHWC), plus
                         `labels` [N] for class-conditional models; with npz alone the PNGs
                         are removed once it is written
  grid.png               the first 64 samples, 8 per row
  spec.json, source.json (the model and settings the samples came from), summary.json
A toy (2-D) run writes samples.npz (`points` [N, 2]) and samples.png instead.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from traflow_cli.engine.checkpoint import run_checkpoint, sha256_file
from traflow_cli.engine.distributed import barrier
from traflow_cli.engine.loop import stop_requests
from traflow_cli.engine.progress import ProgressBar
from traflow_cli.engine.records import atomic_write_json, write_summary
from traflow_cli.engine.runtime import Runtime
from traflow_cli.errors import Interrupted, one_line
from traflow_cli.flow import solve_rk45_per_sample
from traflow_cli.grids import resolve_grid, rk45_start_time, student_times
from traflow_cli.jobs.common import RunClaim, claim_run_dir, sample_shape
from traflow_cli.jobs.writers import (
    PNGWriter,
    existing_indices,
    image_grid,
    incomplete_pngs,
    panels_row,
    png_rows,
    read_pngs,
    remove_partial,
    sample_path,
    save_image,
    save_npz,
    save_npz_rows,
    scatter_panel,
    to_uint8,
)
from traflow_cli.models import Student, Teacher, load_student, load_teacher
from traflow_cli.runfolder import MAX_RECORD_BYTES
from traflow_cli.sampling import (
    noise_for_indices,
    sample_student,
    sample_teacher,
    start_state,
    teacher_nfe,
    teacher_row_velocity,
    teacher_velocity,
)
from traflow_cli.specs import RunSpec, SampleSpec, SpecError
from traflow_cli.untrusted import load_npz, memory_budget, read_json_file

log = logging.getLogger("traflow")

IMAGES_DIR = "images"
GRID_COUNT = 64


def load_model(run_dir: Path, device: torch.device) -> Teacher | Student:
    role = run_checkpoint(run_dir).metadata.get("role")
    return (load_student if role == "student" else load_teacher)(run_dir, device)


def class_labels(indices: list[int], cfg: SampleSpec, num_classes: int,
                 device: torch.device) -> Tensor | None:
    """A fixed class, or labels cycling evenly through the classes by sample index, [B]."""
    if num_classes == 0:
        return None
    labels = [cfg.class_label if cfg.class_label is not None else i % num_classes
              for i in indices]
    return torch.tensor(labels, device=device)


def generate(model: nn.Module, noise: Tensor, cfg: SampleSpec, labels: Tensor | None,
             runtime: Runtime, fresh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One batch of samples from noise [B, ...]; returns (samples, NFE of each sample [B])."""
    batch = noise.shape[0]
    # The run's own grid for "native": where the student was distilled, the teacher's native.
    grid = resolve_grid(cfg.time_grid, model.time_grid if isinstance(model, Student)
                        else model.native_grid)
    with runtime.autocast():
        if isinstance(model, Student):
            times = (student_times(cfg.nfe, cfg.times) if cfg.times is not None else
                     model.times(cfg.nfe, grid))
            x = sample_student(model.net, start_state(noise, times[0]), times, labels=labels,
                               gamma=cfg.gamma, fresh=fresh)
            return x, torch.full((batch,), cfg.nfe)
        if cfg.solver == "rk45":
            # Step sizes per sample: the batch a sample lands in never changes its image.
            t0 = rk45_start_time(grid, model.sigma_range)
            return solve_rk45_per_sample(teacher_row_velocity(model, labels),
                                         start_state(noise, t0), t0=t0, rtol=cfg.rtol,
                                         atol=cfg.atol)
        x, nfe = sample_teacher(teacher_velocity(model, labels), noise, solver=cfg.solver,
                                steps=cfg.steps, grid=grid, sigma_range=model.sigma_range)
        return x, torch.full((batch,), nfe)


def sampling_source(spec: RunSpec, run_dir: Path, model: Teacher | Student) -> dict[str, Any]:
    """What decides the images: the checkpoint, the seed and the settings this model uses.

    Batch size, sample count, format and write_grid are left out: they never change image i.
    """
    cfg = spec.sample
    ckpt = run_checkpoint(run_dir)
    source: dict[str, Any] = {
        "model": str(run_dir.resolve()), "checkpoint": ckpt.path.name,
        "checkpoint_sha256": ckpt.sha256 or sha256_file(ckpt.path), "seed": spec.seed,
        "sample.class_label": cfg.class_label}
    if isinstance(model, Student):
        source.update({"role": "student", "sample.nfe": cfg.nfe, "sample.times": cfg.times,
                       "sample.gamma": cfg.gamma})
    elif cfg.solver == "rk45":
        source.update({"role": "teacher", "sample.solver": "rk45", "sample.rtol": cfg.rtol,
                       "sample.atol": cfg.atol})
    else:
        source.update({"role": "teacher", "sample.solver": cfg.solver, "sample.steps": cfg.steps})
    if cfg.time_grid != "native" and not (isinstance(model, Student) and cfg.times is not None
                                         or cfg.solver == "rk45" and isinstance(model, Teacher)):
        source["sample.time_grid"] = cfg.time_grid  # recorded only when it is not the default
    return source


def check_resume(out: Path, source: dict[str, Any]) -> None:
    """Refuse to add samples to a folder whose existing ones came from something else."""
    path = out / "source.json"
    if not path.is_file():
        return
    try:
        saved = read_json_file(path, max_bytes=MAX_RECORD_BYTES)
    except (OSError, ValueError) as err:
        raise SpecError(f"--out: {path} is not readable ({one_line(err)}); restore it, or choose "
                        "another --out") from None
    if not isinstance(saved, dict):
        raise SpecError(f"--out: {path} is not a traflow source record; restore it, or choose "
                        "another --out")
    # The model may move; its checkpoint's contents may not.
    differ = [k for k in sorted(set(saved) | set(source))
              if k != "model" and saved.get(k) != source.get(k)]
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {source.get(k)!r}" for k in differ[:4])
        raise SpecError(f"--out: {out} holds samples made differently ({changes}); re-run with "
                        "the same model and settings to resume, or choose another --out")


def sample_run(spec: RunSpec, run_dir: Path, out: Path, runtime: Runtime) -> dict[str, Any]:
    """Write spec.sample.num_samples samples of the model in run_dir to out/, filling gaps only.

    Sample i is made from noise seeded by (seed, i) alone, so batch size, process count and
    interruptions never change which image index i holds.
    """
    with claim_run_dir(out, spec, job="sample", sections=("seed", "sample"),
                       runtime=runtime) as claim:
        return _sample_run(spec, run_dir, claim, runtime)


def _sample_run(spec: RunSpec, run_dir: Path, claim: RunClaim, runtime: Runtime
                ) -> dict[str, Any]:
    out = claim.run_dir
    cfg = spec.sample
    model = load_model(run_dir, runtime.device)
    config = model.config
    shape = sample_shape(config)
    is_points = config["kind"] == "mlp"
    num_classes = config.get("num_classes", 0)
    if cfg.class_label is not None and cfg.class_label >= num_classes:
        allowed = f"0..{num_classes - 1}" if num_classes else "none: the model is unconditional"
        raise SpecError(f"sample.class_label: {cfg.class_label} is not a class of this model "
                        f"(classes: {allowed})")
    source = sampling_source(spec, run_dir, model)
    check_resume(out, source)
    images_dir = out / IMAGES_DIR
    # What cannot fit is refused before anything is written (the counts come from one listing).
    done = set() if is_points else {i for i in existing_indices(images_dir) if i < cfg.num_samples}
    check_room(out, cfg, shape, is_points, cfg.num_samples - len(done))
    claim.write_record()
    if runtime.is_main:
        atomic_write_json(out / "source.json", source)
        if not is_points:
            remove_partial(images_dir)
            _unpack_npz(out, images_dir, cfg.num_samples)
            _remove_incomplete(images_dir, cfg.num_samples)
    barrier()  # source.json and any unpacked PNGs exist before the ranks look for gaps
    done = set() if is_points else {i for i in existing_indices(images_dir) if i < cfg.num_samples}
    todo_count = cfg.num_samples - len(done)
    # Ranks split image work by sample index; a point cloud is one file, made by rank 0. The
    # indices are a stream, never a list of num_samples.
    if is_points:
        mine_count = cfg.num_samples if runtime.is_main else 0
        mine = iter(range(mine_count))
    else:
        mine = _my_indices(cfg.num_samples, done, runtime.rank, runtime.world_size)
        mine_count = len(range(runtime.rank, todo_count, runtime.world_size))
    done_before = cfg.num_samples - todo_count
    writer = None if is_points else PNGWriter(images_dir)
    points: list[Tensor] = []
    nfe_seen: list[Tensor] = []
    nonfinite = torch.zeros((), dtype=torch.long)
    began = time.perf_counter()
    # The fresh noise of gamma-sampling is seeded per sample too: steps 1.. of the same stream.
    fresh_steps = cfg.nfe - 1 if isinstance(model, Student) and cfg.gamma > 0 else 0
    try:
        # Ctrl-C/SIGTERM stop after the batch in flight, as the training jobs do, also when
        # the process was started with SIGINT ignored (a background job of a script).
        with stop_requests() as stop, ProgressBar(
                "sample", done_before + mine_count, completed=done_before,
                enabled=runtime.is_main, unit="sample", rate_unit="samples") as bar:
            made = 0
            while indices := list(itertools.islice(mine, cfg.batch_size)):
                if stop["stop"]:
                    raise KeyboardInterrupt
                draws = noise_for_indices(indices, (1 + fresh_steps, *shape), spec.seed)
                noise = runtime.place_batch(draws[:, 0])
                fresh = draws[:, 1:].to(runtime.device) if fresh_steps else None
                labels = class_labels(indices, cfg, num_classes, runtime.device)
                x, nfe = generate(model, noise, cfg, labels, runtime, fresh)
                nfe_seen.append(nfe.cpu())
                nonfinite += (~torch.isfinite(x.flatten(1))).any(1).sum().cpu()
                if writer is None:
                    points.append(x.float().cpu())
                else:
                    writer.write(indices, to_uint8(x))
                made += len(indices)
                bar.update(done_before + made)
    except KeyboardInterrupt:
        if writer is not None:
            writer.close()  # what was made is on disk before we say so
        raise Interrupted(f"interrupted; the finished samples are in {out}. Re-run the same "
                          "command to make the rest") from None
    finally:
        if writer is not None:
            writer.close()
    barrier()  # every rank's PNGs exist before rank 0 reads them back
    if int(nonfinite):
        log.warning("%d of the %d samples made now were not finite (NaN or inf: the model's "
                    "weights or its solver diverged); they were written clamped", int(nonfinite),
                    mine_count)
    seconds = time.perf_counter() - began
    nfe_all = torch.cat(nfe_seen).double() if nfe_seen else None
    role = "student" if isinstance(model, Student) else "teacher"
    summary: dict[str, Any] = {
        "job": "sample", "model": str(run_dir), "role": role,
        "checkpoint": source["checkpoint"], "num_samples": cfg.num_samples,
        "made_now": mine_count,
        # Network evaluations per sample: exact for students and fixed-step solvers; for RK45
        # the mean (and max) over the samples made now (each sample has its own step sizes).
        "nfe": _fixed_nfe(model, cfg) if not (role == "teacher" and cfg.solver == "rk45") else (
            round(float(nfe_all.mean()), 2) if nfe_all is not None else None),
        "nfe_max": int(nfe_all.max()) if nfe_all is not None else None,
        "seconds": round(seconds, 3),
        "samples_per_s": round(mine_count / seconds, 2) if mine_count else None,
        "solver": None if role == "student" else cfg.solver,
        "nonfinite_samples": int(nonfinite),
        "out": str(out)}
    if runtime.is_main:
        if is_points:
            cloud = torch.cat(points) if points else torch.empty(0, *shape)
            save_npz(out / "samples.npz", points=cloud.numpy())
            save_image(out / "samples.png", panels_row([scatter_panel(cloud, _title(summary))]))
            summary["npz"] = str(out / "samples.npz")
        else:
            summary.update(_finish_images(out, images_dir, cfg, num_classes))
        write_summary(out, summary)
    return summary


def _my_indices(count: int, done: set[int], rank: int, world_size: int) -> Iterator[int]:
    """This rank's share of the indices in [0, count) without a finished PNG, in order."""
    todo = (i for i in range(count) if i not in done)
    return itertools.islice(todo, rank, None, world_size)


def _remove_incomplete(images_dir: Path, count: int) -> None:
    """Delete sample PNGs that are not whole (a disk that filled up, a crash before the data
    reached the disk), so that they are made again rather than trusted."""
    found = sorted(i for i in existing_indices(images_dir) if i < count)
    bad = incomplete_pngs(images_dir, found)
    for i in bad:
        sample_path(images_dir, i).unlink(missing_ok=True)
    if bad:
        log.warning("%d sample PNGs in %s were incomplete (e.g. %s); making them again", len(bad),
                    images_dir, sample_path(images_dir, bad[0]).name)


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_room(out: Path, cfg: SampleSpec, shape: tuple[int, ...], is_points: bool,
               missing: int) -> None:
    """Refuse up front what cannot fit: the bytes and files `missing` more samples need at the
    least (a PNG cannot beat deflate's ~1032:1, and takes a block of the file system) against
    the space and inodes free under out, and the memory one batch or a point cloud takes."""
    budget = memory_budget()
    per_sample = 4 * math.prod(shape)  # float32 noise or points
    fresh = cfg.nfe if cfg.gamma > 0 else 1
    if budget is not None and cfg.batch_size * per_sample * fresh > budget:
        raise SpecError(f"sample.batch_size: {cfg.batch_size:,} samples of {list(shape)} need "
                        f"{_gb(cfg.batch_size * per_sample * fresh)} of noise alone, more than "
                        f"the {_gb(budget)} of memory free; lower sample.batch_size")
    if is_points and budget is not None and 2 * missing * per_sample > budget:
        raise SpecError(f"sample.num_samples: {missing:,} points need {_gb(2 * missing * per_sample)} "
                        f"of memory, more than the {_gb(budget)} free; lower sample.num_samples")
    if missing <= 0:
        return
    try:
        fs = os.statvfs(out)
    except (AttributeError, OSError):  # no statvfs (Windows): a full disk is caught as it happens
        return
    if is_points:
        need, files = missing * per_sample, 0
    else:
        channels, height, width = shape
        png = 57 + math.ceil(height * (width * channels + 1) / 1032)
        block = fs.f_frsize or 1
        if fs.f_files:  # an inode file system (ext4, xfs, tmpfs): each file takes whole blocks
            png = math.ceil(png / block) * block
        need, files = missing * png, missing
        if cfg.format in ("npz", "both"):
            need += cfg.num_samples * channels * height * width
    free_bytes, free_files = fs.f_bavail * fs.f_frsize, fs.f_favail
    if need > free_bytes or (fs.f_files and files > free_files):
        what = f"{_gb(need)}" + (f" and {files:,} files" if files else "")
        room = f"{_gb(free_bytes)}" + (f" and {free_files:,} files" if fs.f_files else "")
        raise SpecError(f"sample.num_samples: {missing:,} more samples need at least {what} in "
                        f"{out}, which has {room} free; free space there, choose another --out, "
                        "or lower sample.num_samples")


def _fixed_nfe(model: Teacher | Student, cfg: SampleSpec) -> int:
    if isinstance(model, Student):
        return cfg.nfe
    return teacher_nfe(cfg.solver, cfg.steps, model.sigma_range)


def _finish_images(out: Path, images_dir: Path, cfg: SampleSpec,
                   num_classes: int) -> dict[str, Any]:
    """grid.png and (--format npz|both) samples.npz from the PNGs; npz alone drops the PNGs."""
    made: dict[str, Any] = {"images": str(images_dir)}
    if cfg.write_grid:
        save_image(out / "grid.png", image_grid(read_pngs(images_dir, min(GRID_COUNT,
                                                                           cfg.num_samples))))
        made["grid"] = str(out / "grid.png")
    if cfg.format in ("npz", "both"):
        first = read_pngs(images_dir, 1)  # [1, H, W, C]: the shape every sample has
        labels = {}
        if num_classes:
            indices = list(range(cfg.num_samples))
            labels["labels"] = class_labels(indices, cfg, num_classes, torch.device("cpu")).numpy()
        # Streamed from the PNGs: memory holds a few hundred images, whatever num_samples is.
        save_npz_rows(out / "samples.npz", "images", (cfg.num_samples, *first.shape[1:]),
                      np.uint8, png_rows(images_dir, cfg.num_samples), **labels)
        made["npz"] = str(out / "samples.npz")
    if cfg.format == "npz":
        shutil.rmtree(images_dir)
        made["images"] = None
    return made


def _unpack_npz(out: Path, images_dir: Path, count: int) -> None:
    """Restore the PNGs of an earlier --format npz run, so that only new indices are made."""
    path = out / "samples.npz"
    if not path.is_file() or existing_indices(images_dir):
        return
    try:
        images = load_npz(path, ["images"]).get("images")
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        raise SpecError(f"--out: {path} is not readable ({one_line(err)}); remove it to make the "
                        "samples again, or choose another --out") from None
    if images is None or images.dtype != np.uint8 or images.ndim != 4:
        return
    images = images[:count]
    with PNGWriter(images_dir) as writer:
        writer.write(list(range(len(images))), images)


def _title(summary: dict[str, Any]) -> str:
    return f"{summary['role']} NFE {summary['nfe']}"
