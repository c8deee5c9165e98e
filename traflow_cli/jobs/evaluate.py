"""`traflow eval`: toy distances, teacher-student agreement, and FID."""

from __future__ import annotations

import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from traflow_cli.data.toy import sample_toy
from traflow_cli.engine.loop import terminate_as_interrupt
from traflow_cli.engine.progress import ProgressBar
from traflow_cli.engine.records import atomic_write_json
from traflow_cli.engine.runtime import Runtime, resolve_device
from traflow_cli.errors import Interrupted, UserError, one_line, writing
from traflow_cli.jobs.common import sample_shape
from traflow_cli.jobs.writers import panels_row, save_image, scatter_panel
from traflow_cli.metrics.agreement import mse_psnr, straightness
from traflow_cli.metrics.toy import mmd_rbf, sliced_wasserstein
from traflow_cli.models import load_student, load_teacher
from traflow_cli.runfolder import read_record
from traflow_cli.sampling import (
    noise_for_indices,
    sample_teacher,
    teacher_velocity,
)
from traflow_cli.seeding import generator_for
from traflow_cli.specs import RunSpec, SpecError
from traflow_cli.untrusted import load_npz, memory_budget, npz_names


class SamplesFileError(UserError, ValueError):
    """A samples file that cannot be measured: one line naming the file, what is wrong, the fix."""


# What np.load raises on a missing, truncated or foreign file (a zip with a bad member included).
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def read_toy_points(path: Path, dim: int) -> Tensor:
    """points [N, dim] float32 from the samples.npz of a toy run; anything else is one line."""
    fix = "pass the samples.npz written by 'traflow sample' for a toy run"
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no such file"
        raise SamplesFileError(f"{path}: {what}; {fix}")
    try:
        with open(path, "rb") as handle:
            bare_npy = handle.read(6) == b"\x93NUMPY"
    except OSError as exc:
        raise SamplesFileError(f"{path}: not a readable .npz ({one_line(exc)}); {fix}") from None
    if bare_npy:
        raise SamplesFileError(f"{path}: a bare .npy array, not an .npz with 'points'; {fix}")
    try:  # untrusted: never unpickled, and no header's claimed size is allocated unchecked
        names = npz_names(path)
    except _NPZ_ERRORS as exc:
        raise SamplesFileError(f"{path}: not a readable .npz ({one_line(exc)}); {fix}") from None
    if "points" not in names:
        found = ", ".join(names) or "nothing"
        raise SamplesFileError(f"{path}: no 'points' array (found {found}); {fix}")
    try:
        points = load_npz(path, ["points"])["points"]
    except _NPZ_ERRORS as exc:
        raise SamplesFileError(f"{path}: cannot read its 'points' ({one_line(exc)}); "
                               f"{fix}") from None
    numeric = np.issubdtype(points.dtype, np.integer) or np.issubdtype(points.dtype, np.floating)
    if not numeric or points.ndim != 2 or points.shape[1] != dim or len(points) < 2:
        raise SamplesFileError(f"{path}: 'points' is {points.dtype} {list(points.shape)}, not "
                               f"[N >= 2, {dim}] numbers; {fix}")
    return torch.from_numpy(points).float()


def evaluate_toy(spec: RunSpec, *, teacher_dir: Path | None, student_dir: Path | None,
                 sample_files: list[Path], out: Path | None, runtime: Runtime) -> dict[str, Any]:
    """Distances to fresh true samples for the teacher at several Euler step counts, the
    student at several NFE, and any sample files; the first row is the two-true-sets floor."""
    cfg = spec.eval
    n = cfg.num_samples
    # Sliced Wasserstein sorts two [n, projections] float64 arrays (and their product); MMD
    # holds a few [m, m] kernels: refused up front if that cannot fit, not after minutes.
    need = 3 * 8 * n * cfg.projections + 4 * 8 * min(cfg.mmd_samples, n) ** 2
    budget = memory_budget()
    if budget is not None and need > budget:
        raise SpecError(f"eval.num_samples: {n:,} samples x {cfg.projections:,} projections need "
                        f"{need / 1e9:,.1f} GB of memory, more than the {budget / 1e9:,.1f} GB "
                        "free; lower eval.num_samples, eval.projections or eval.mmd_samples")
    truth = sample_toy(spec.data.name, n, generator_for(spec.seed, 4))
    # Every file is read before any model runs, so a bad one fails the command at once.
    files = [(path, read_toy_points(path, truth.shape[1])) for path in sample_files]

    def measure(label: str, points: Tensor, **info: Any) -> dict[str, Any]:
        m = min(cfg.mmd_samples, len(points), n)
        return {"model": label, **info, "num_samples": len(points),
                "sliced_wasserstein": sliced_wasserstein(
                    points[:n], truth[:len(points)], projections=cfg.projections,
                    generator=generator_for(spec.seed, 6)),
                "mmd": mmd_rbf(points[:m], truth[:m])}

    rows = [measure("true samples (noise floor)",
                    sample_toy(spec.data.name, n, generator_for(spec.seed, 5)))]
    pictures = [scatter_panel(truth, "true distribution")]
    noise = noise_for_indices(range(n), (2,), spec.seed).to(runtime.device)
    if teacher_dir is not None:
        teacher = load_teacher(teacher_dir, runtime.device)
        for steps in cfg.teacher_steps:
            x, nfe = sample_teacher(teacher.velocity, noise, solver="euler", steps=steps)
            rows.append(measure("teacher", x.cpu(), solver="euler", nfe=nfe))
            if steps in (1, max(cfg.teacher_steps)):
                pictures.append(scatter_panel(x, f"teacher Euler {steps}"))
    if student_dir is not None:
        student = load_student(student_dir, runtime.device)
        for nfe in cfg.student_nfe:
            x = student.sample(noise, nfe=nfe)
            rows.append(measure("student", x.cpu(), nfe=nfe))
            pictures.append(scatter_panel(x, f"student NFE {nfe}"))
    for path, points in files:
        rows.append(measure(str(path), points))
        pictures.append(scatter_panel(points, path.parent.name or path.name))
    result = {"metric": "toy", "distribution": spec.data.name, "rows": rows}
    if out is not None and runtime.is_main:
        with writing(out):  # a read-only or full file system: one line naming the folder
            out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "eval.json", result)
        save_image(out / "eval.png", panels_row(pictures))
        result["picture"] = str(out / "eval.png")
    return result


def evaluate_agreement(spec: RunSpec, *, student_dir: Path, teacher_dir: Path,
                       out: Path | None, runtime: Runtime) -> dict[str, Any]:
    """The same noise through the student at each NFE and the teacher's accurate RK45 solve."""
    cfg = spec.eval
    student = load_student(student_dir, runtime.device)
    teacher = load_teacher(teacher_dir, runtime.device)
    if student.config != teacher.config:
        raise SpecError(f"--teacher: {teacher_dir} has a different network from the student's "
                        "teacher; pass the teacher it was distilled from")
    count = min(cfg.num_samples, 256 if student.config["kind"] != "mlp" else cfg.num_samples)
    noise = noise_for_indices(range(count), sample_shape(student.config), spec.seed)
    noise = noise.to(runtime.device)
    num_classes = student.config.get("num_classes", 0)
    labels = (torch.arange(count, device=runtime.device) % num_classes) if num_classes else None
    velocity = teacher_velocity(teacher, labels)
    # An EDM teacher starts at t_min and steps on its native grid (Teacher.sample's rules).
    native = {"grid": teacher.native_grid, "sigma_range": teacher.sigma_range}
    reference, teacher_nfe = sample_teacher(velocity, noise, solver="rk45", rtol=spec.sample.rtol,
                                            atol=spec.sample.atol, **native)
    rows = []
    for nfe in cfg.student_nfe:
        x = student.sample(noise, nfe=nfe, class_labels=labels)
        mse, psnr = mse_psnr(x, reference)
        rows.append({"model": "student", "nfe": nfe, "mse": mse, "psnr_db": psnr})
    for steps in cfg.teacher_steps:
        x, nfe = sample_teacher(velocity, noise, solver="euler", steps=steps, **native)
        mse, psnr = mse_psnr(x, reference)
        rows.append({"model": "teacher", "solver": "euler", "nfe": nfe, "mse": mse,
                     "psnr_db": psnr})
    result = {"metric": "agreement", "num_samples": count, "reference": "teacher rk45",
              "reference_nfe": teacher_nfe,
              "straightness": straightness(student.net, noise, generator_for(spec.seed, 7),
                                           labels),
              "rows": rows}
    if out is not None and runtime.is_main:
        atomic_write_json(out / "agreement.json", result)
    return result


# FID is biased upward at small N; CIFAR-10 results are reported at 50,000 samples.
FID_PROTOCOL_SAMPLES = 50_000


def fid_samples_path(samples: Path) -> tuple[Path, list[str]]:
    """What to measure: a `traflow sample` folder becomes its images/ (else its samples.npz);
    any other folder, .zip or .npz is taken as given. Returns (path, warnings)."""
    from traflow_cli.jobs.sample import IMAGES_DIR
    from traflow_cli.jobs.writers import existing_indices
    from traflow_cli.metrics.fid import FIDError

    record = samples / "spec.json"
    if not (samples.is_dir() and record.is_file()):
        return samples, []
    saved = read_record(samples) or {}
    if saved.get("job") != "sample":
        raise FIDError(f"{samples} is a {saved.get('job')!r} run folder, not samples; pass the "
                       "folder written by 'traflow sample' (or its samples.npz)")
    section = saved["spec"].get("sample")
    wanted = section.get("num_samples") if isinstance(section, dict) else None
    wanted = wanted if isinstance(wanted, int) else 0  # an edited record: measure what is there
    found = len(existing_indices(samples / IMAGES_DIR))
    if found:
        warnings = [] if found >= wanted else [
            f"warning: {samples} holds {found} of {wanted} samples (an interrupted "
            "'traflow sample'? re-run it to finish); measuring those"]
        return samples / IMAGES_DIR, warnings
    if (samples / "samples.npz").is_file():
        return samples / "samples.npz", []
    raise FIDError(f"{samples}: no samples yet ({IMAGES_DIR}/ and samples.npz are missing); "
                   "run 'traflow sample' first")


def evaluate_fid(spec: RunSpec, *, samples: Path, out: Path | None, batch_size: int | None = None,
                 num_workers: int = 0, allow_download: bool = True) -> dict[str, Any]:
    """FID of samples (a `traflow sample` folder, an image folder, .zip or .npz) against
    spec.eval.fid_reference with clean-fid's protocol for spec.eval.fid_mode; writes fid.json
    to out (None: do not write). The result's `warnings` are one-line notes for stderr.

    Ctrl-C or SIGTERM stops it with Interrupted (exit code 130), keeping what is finished:
    reference statistics are cached whole (atomically) once measured, never in part.
    """
    from traflow_cli.metrics.features import feature_progress
    from traflow_cli.metrics.fid import FIDError, compute_fid

    cfg = spec.eval
    if cfg.fid_reference is None:
        raise SpecError("--ref: no reference given and eval.fid_reference is not set; pass "
                        "--ref cifar10 (clean-fid statistics), a folder or .zip of images, or a "
                        "statistics .npz (mu, sigma)")
    device = resolve_device(spec.runtime.device)
    measured, warnings = fid_samples_path(samples)
    began = time.perf_counter()
    try:
        with terminate_as_interrupt(), feature_progress(
                lambda title, total: ProgressBar(title, total, unit="image")):
            fid = compute_fid(measured, cfg.fid_reference, mode=cfg.fid_mode,
                              split=cfg.fid_split, batch_size=batch_size, device=device,
                              num_workers=num_workers, allow_download=allow_download)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; no FID was measured (reference statistics measured "
                          "before are kept in the cache); re-run the same command") from None
    if fid.num_samples < FID_PROTOCOL_SAMPLES:
        warnings.append(f"warning: FID of {fid.num_samples:,} samples is biased upward at small "
                        f"N; measure {FID_PROTOCOL_SAMPLES:,} (the CIFAR-10 protocol) for numbers "
                        "comparable with published ones")
    result = {"metric": "fid", **fid.to_dict(), "device": str(device),
              "seconds": round(time.perf_counter() - began, 3), "warnings": warnings}
    if out is not None:
        try:
            atomic_write_json(out / "fid.json", result)
        except OSError as exc:
            raise FIDError(f"cannot write {out / 'fid.json'} ({exc.strerror or exc}); pass --out "
                           "a writable folder") from None
        result["written"] = str(out / "fid.json")
    return result
