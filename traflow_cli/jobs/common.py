"""Pieces every job shares: runtime from the spec, run-folder checks, optimiser, batches."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from traflow_cli.engine.records import read_spec_record, write_spec_record
from traflow_cli.engine.runtime import Runtime, setup_runtime
from traflow_cli.specs import RunSpec, SpecError, TrainingSpec, resume_conflicts


def runtime_for(spec: RunSpec) -> Runtime:
    return setup_runtime(**spec.runtime.model_dump(), image_model=not spec.data.is_toy)


def prepare_run_dir(run_dir: Path, spec: RunSpec, *, job: str, sections: tuple[str, ...],
                    runtime: Runtime) -> bool:
    """Check a resumed run matches its spec, then (re)write spec.json. Returns True on resume."""
    saved = read_spec_record(run_dir)
    if saved is not None:
        if saved["job"] != job:
            raise SpecError(f"--out: {run_dir} holds a {saved['job']!r} run, not {job!r}; "
                            "choose another --out")
        conflicts = resume_conflicts(saved["spec"], spec.model_dump(mode="json"), sections)
        if conflicts:
            raise SpecError(f"--out: {run_dir} was started with different settings "
                            f"({', '.join(conflicts)}); re-run with the same settings to resume, "
                            "or choose another --out")
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_spec_record(run_dir, job=job, spec=spec.model_dump(mode="json"),
                          fingerprint=spec.fingerprint(sections))
    return saved is not None


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
