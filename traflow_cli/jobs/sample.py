"""`traflow sample`: samples from a teacher (ODE) or a student (any NFE), resumable."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from traflow_cli.api import Student, Teacher, load_student, load_teacher
from traflow_cli.engine.checkpoint import run_checkpoint
from traflow_cli.engine.distributed import barrier
from traflow_cli.engine.progress import ProgressBar
from traflow_cli.engine.records import atomic_write_bytes, write_spec_record, write_summary
from traflow_cli.engine.runtime import Runtime
from traflow_cli.jobs.common import sample_shape
from traflow_cli.jobs.writers import (
    PNGWriter,
    image_grid,
    missing_indices,
    panels_row,
    read_pngs,
    save_image,
    scatter_panel,
    to_uint8,
)
from traflow_cli.sampling import noise_for_indices, sample_student, sample_teacher, student_times
from traflow_cli.specs import RunSpec, SampleSpec


def load_model(run_dir: Path, device: torch.device) -> Teacher | Student:
    role = run_checkpoint(run_dir).metadata.get("role")
    return (load_student if role == "student" else load_teacher)(run_dir, device)


def class_labels(indices: list[int], cfg: SampleSpec, num_classes: int,
                 device: torch.device) -> Tensor | None:
    """A fixed class, or labels cycling evenly through the classes by sample index."""
    if num_classes == 0:
        return None
    labels = [cfg.class_label if cfg.class_label is not None else i % num_classes
              for i in indices]
    return torch.tensor(labels, device=device)


def generate(model: nn.Module, noise: Tensor, cfg: SampleSpec, labels: Tensor | None,
             runtime: Runtime) -> tuple[Tensor, int]:
    """One batch of samples from noise; returns (samples, network evaluations per sample)."""
    with runtime.autocast():
        if isinstance(model, Student):
            times = student_times(cfg.nfe, cfg.times)
            return sample_student(model.net, noise, times, labels=labels, gamma=cfg.gamma), cfg.nfe
        velocity = (model.velocity if labels is None
                    else lambda x, t: model.velocity(x, t, class_labels=labels))
        return sample_teacher(velocity, noise, solver=cfg.solver, steps=cfg.steps,
                              rtol=cfg.rtol, atol=cfg.atol)


def sample_run(spec: RunSpec, run_dir: Path, out: Path, runtime: Runtime) -> dict[str, Any]:
    """Write spec.sample.num_samples samples of the model in run_dir to out/, filling gaps only.

    Sample i is made from noise seeded by (seed, i) alone, so batch size, process count and
    interruptions never change which image index i holds.
    """
    cfg = spec.sample
    model = load_model(run_dir, runtime.device)
    config = model.config
    shape = sample_shape(config)
    is_points = config["kind"] == "mlp"
    if runtime.is_main:
        write_spec_record(out, job="sample", spec=spec.model_dump(mode="json"),
                          fingerprint=spec.fingerprint(("seed", "sample")))
    todo = list(range(cfg.num_samples)) if is_points else missing_indices(out, cfg.num_samples)
    # Ranks split image work by sample index; a point cloud is one file, made by rank 0.
    mine = (todo if runtime.is_main else []) if is_points else todo[runtime.rank::runtime.world_size]
    writer = None if is_points else PNGWriter(out)
    points: list[Tensor] = []
    nfe_used = 0
    began = time.perf_counter()
    with ProgressBar("sample", len(mine), enabled=runtime.is_main, unit="samples") as bar:
        for start in range(0, len(mine), cfg.batch_size):
            indices = mine[start:start + cfg.batch_size]
            noise = runtime.place_batch(noise_for_indices(indices, shape, spec.seed))
            labels = class_labels(indices, cfg, config.get("num_classes", 0), runtime.device)
            x, nfe_used = generate(model, noise, cfg, labels, runtime)
            if writer is None:
                points.append(x.float().cpu())
            else:
                writer.write(indices, to_uint8(x))
            bar.update(start + len(indices))
    if writer is not None:
        writer.close()
    barrier()  # every rank's PNGs exist before rank 0 reads them back
    seconds = time.perf_counter() - began
    summary = {"job": "sample", "model": str(run_dir), "role": "student"
               if isinstance(model, Student) else "teacher", "num_samples": cfg.num_samples,
               "made_now": len(mine), "nfe": nfe_used, "seconds": round(seconds, 3),
               "samples_per_s": round(len(mine) / seconds, 2) if mine else None,
               "solver": None if isinstance(model, Student) else cfg.solver}
    if runtime.is_main:
        if is_points:
            cloud = torch.cat(points) if points else torch.empty(0, *shape)
            _save_npz(out / "samples.npz", points=cloud.numpy())
            save_image(out / "samples.png", panels_row([scatter_panel(cloud, _title(summary))]))
        else:
            first = read_pngs(out, min(64, cfg.num_samples))
            if cfg.grid:
                save_image(out / "grid.png", image_grid(first))
            if cfg.format in ("npz", "both"):
                _save_npz(out / "samples.npz", images=read_pngs(out, cfg.num_samples))
        write_summary(out, summary)
    return summary


def _title(summary: dict[str, Any]) -> str:
    return f"{summary['role']} NFE {summary['nfe']}"


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
