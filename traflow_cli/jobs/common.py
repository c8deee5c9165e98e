"""Pieces every job shares: runtime from the spec, run-folder checks, optimiser, batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from traflow_cli.engine.distributed import any_rank, barrier
from traflow_cli.engine.loop import TrainTask, train
from traflow_cli.engine.records import write_spec_record, write_summary
from traflow_cli.engine.runtime import Runtime, setup_runtime
from traflow_cli.errors import UserError, writing
from traflow_cli.runfolder import (
    LOCK,
    RunFolderError,
    RunLock,
    check_output_folder,
    read_record,
    remove_stale_temporaries,
)
from traflow_cli.specs import RunSpec, SpecError, TrainingSpec, resume_conflicts


def runtime_for(spec: RunSpec) -> Runtime:
    return setup_runtime(**spec.runtime.model_dump(), image_model=not spec.data.is_toy)


@dataclass
class RunClaim:
    """A run folder this job holds the lock of; `write_record` once its inputs are checked."""

    run_dir: Path
    spec: RunSpec
    job: str
    sections: tuple[str, ...]
    runtime: Runtime
    resumed: bool

    def write_record(self) -> None:
        """spec.json, written only after the job's inputs (data, teacher, nets) were checked, so
        a failed start never leaves a record that blocks the corrected command."""
        if self.runtime.is_main:
            write_spec_record(self.run_dir, job=self.job, spec=self.spec.model_dump(mode="json"),
                              fingerprint=self.spec.fingerprint(self.sections))
        barrier()


@contextmanager
def claim_run_dir(run_dir: Path, spec: RunSpec, *, job: str, sections: tuple[str, ...],
                  runtime: Runtime) -> Iterator[RunClaim]:
    """Hold `run_dir` for this job: lock it against a second process, refuse a folder of another
    job or someone else's files, refuse a resume with different settings, sweep temporaries that
    killed writes left. Rank 0 takes the lock; every rank raises if it could not."""
    failure: Exception | None = None
    lock = RunLock(run_dir)
    created = not run_dir.exists()
    if runtime.is_main:
        try:
            check_output_folder(run_dir, job)
            # A read-only or full file system is one line naming the folder, not a traceback.
            with writing(run_dir):
                run_dir.mkdir(parents=True, exist_ok=True)
                lock.acquire()
        except UserError as err:
            failure = err
            if created:
                _remove_if_only_lock(run_dir)
    if any_rank(failure is not None):
        raise failure or RunFolderError(f"{run_dir}: the main process could not claim it")
    try:
        saved = read_record(run_dir)
        started = latest_checkpoint_exists(run_dir)
        if saved is not None and started:
            conflicts = resume_conflicts(saved["spec"], spec.model_dump(mode="json"), sections)
            if conflicts:
                raise SpecError(f"--out: {run_dir} was started with different settings "
                                f"({', '.join(conflicts)}); re-run with the same settings to "
                                "resume, or choose another --out")
        if runtime.is_main:
            remove_stale_temporaries(run_dir, run_dir / "checkpoints")
        yield RunClaim(run_dir, spec, job, sections, runtime, resumed=started)
    finally:
        lock.release()
        if created and runtime.is_main and read_record(run_dir) is None:
            _remove_if_only_lock(run_dir)  # a failed start leaves no folder behind


def _remove_if_only_lock(run_dir: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only folder stays as it is: nothing to undo
        if {p.name for p in run_dir.iterdir()} <= {LOCK}:
            (run_dir / LOCK).unlink(missing_ok=True)
            run_dir.rmdir()


def latest_checkpoint_exists(run_dir: Path) -> bool:
    """Whether the run got as far as a checkpoint (damaged or not): a run without one has
    nothing to resume, so its settings may change freely."""
    return any((run_dir / "checkpoints").glob("step-*.safetensors"))


def rank_rows(global_batch: int, runtime: Runtime) -> slice:
    """This rank's contiguous share of a global batch (same convention as data.stream)."""
    if global_batch % runtime.world_size:
        raise SpecError(f"batch_size: {global_batch} does not split over {runtime.world_size} "
                        "processes; use a multiple of the process count")
    share = global_batch // runtime.world_size
    return slice(runtime.rank * share, (runtime.rank + 1) * share)


def make_optimizer(params: Iterable[nn.Parameter], training: TrainingSpec,
                   runtime: Runtime) -> torch.optim.Optimizer:
    """Adam (fused on CUDA, where it is one kernel per step instead of several per tensor)."""
    return torch.optim.Adam(params, lr=training.lr, betas=training.betas,
                            weight_decay=training.weight_decay,
                            fused=runtime.device.type == "cuda")


def optimizer_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], step: int,
                   training: TrainingSpec) -> Tensor:
    """Linear warm-up of the learning rate, gradient clipping, then the update; returns grad norm."""
    scale = min(1.0, (step + 1) / training.warmup_steps) if training.warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = training.lr * scale
    max_norm = training.grad_clip if training.grad_clip is not None else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if training.nonfinite == "skip" and not bool(torch.isfinite(norm)):  # a host sync, by choice
        optimizer.zero_grad(set_to_none=True)  # leave the weights as they were
        return norm.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()


def sample_shape(net_config: dict[str, Any]) -> tuple[int, ...]:
    """Shape of one sample (no batch dimension) for a network description."""
    if net_config["kind"] == "mlp":
        return (net_config.get("dim", 2),)
    size = net_config.get("image_size", 32)
    return (net_config.get("in_channels", 3), size, size)


def net_metadata(config: dict[str, Any], role: str, **extra: Any) -> dict[str, str]:
    """Checkpoint metadata: safetensors stores strings only."""
    import json

    return {"net_config": json.dumps(config, sort_keys=True), "role": role,
            **{k: json.dumps(v) if not isinstance(v, str) else v for k, v in extra.items()}}


def run_training(job: str, claim: RunClaim, runtime: Runtime, section: TrainingSpec, step: Any,
                 metadata: dict[str, str]) -> dict[str, Any]:
    """Train a built step (its saved_modules, optimizer and step_fn) for the spec section's
    duration with its bookkeeping, then write and return the run's summary."""
    task = TrainTask(
        run_dir=claim.run_dir, title=job, saved_modules=step.saved_modules,
        optimizer=step.optimizer, step_fn=step.step_fn, total_steps=section.duration_steps,
        images_per_step=section.batch_size, metadata=metadata,
        log_every_steps=section.log_every_steps,
        checkpoint_every_steps=section.checkpoint_every_steps,
        keep_checkpoints=section.keep_checkpoints, nonfinite=section.nonfinite)
    summary = {"job": job, **train(task, runtime)}
    if runtime.is_main:
        write_summary(claim.run_dir, summary)
    return summary
