"""The step loop every training job runs: resume, step, log, checkpoint, stop cleanly on Ctrl-C.

The loop knows nothing of the method: a job hands it the modules to save, the optimizer and a
`step_fn(step)` that performs one optimisation step and returns detached scalar metrics.
Randomness inside `step_fn` must derive from (seed, step) (see seeding.py), so a resumed run
repeats exactly the steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from traflow_cli.engine.checkpoint import latest_checkpoint, save_checkpoint
from traflow_cli.engine.distributed import any_rank, barrier, mean_over_ranks, unwrap
from traflow_cli.engine.progress import ProgressBar
from traflow_cli.engine.records import append_metrics
from traflow_cli.engine.runtime import Runtime


class TrainingInterrupted(Exception):
    """Raised after a stop request has been honoured with a checkpoint."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped at step {step}; checkpoint {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class TrainTask:
    """Everything the loop needs from a job."""

    run_dir: Path
    title: str
    saved_modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    step_fn: Callable[[int], dict[str, Tensor]]
    total_steps: int
    images_per_step: int
    metadata: dict[str, str] = field(default_factory=dict)
    log_every_steps: int = 50
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 2


@contextlib.contextmanager
def stop_requests() -> Iterator[dict[str, bool]]:
    """First Ctrl-C/SIGTERM asks for a clean stop at the next step; a second one aborts."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def restore(task: TrainTask) -> int:
    """Load the latest checkpoint of the run folder, if any; returns the step to continue from."""
    ckpt = latest_checkpoint(task.run_dir / "checkpoints")
    if ckpt is None:
        return 0
    for name, module in task.saved_modules.items():
        unwrap(module).load_state_dict(ckpt.weights(name))
    task.optimizer.load_state_dict(ckpt.trainer_state()["optimizer"])
    return ckpt.step


def _save(task: TrainTask, step: int, runtime: Runtime) -> Path | None:
    path = None
    if runtime.is_main:
        path = save_checkpoint(
            task.run_dir / "checkpoints", step=step,
            modules={name: unwrap(m).state_dict() for name, m in task.saved_modules.items()},
            trainer_state={"optimizer": task.optimizer.state_dict()},
            metadata=task.metadata, keep=task.keep_checkpoints)
    barrier()
    return path


def _any_rank_stopping(stop: bool, runtime: Runtime) -> bool:
    # Every rank must leave at the same step, or the others would wait forever in a collective.
    return any_rank(stop)


def train(task: TrainTask, runtime: Runtime) -> dict[str, Any]:
    """Run task.step_fn from the last checkpoint to task.total_steps; returns a summary."""
    start = restore(task)
    last_row: dict[str, Any] = {}
    checkpoint = None
    sums: dict[str, Tensor] = {}
    count = 0
    tick = time.perf_counter()
    began = tick
    with stop_requests() as flag, ProgressBar(task.title, task.total_steps, completed=start,
                                              enabled=runtime.is_main) as bar:
        for step in range(start, task.total_steps):
            metrics = task.step_fn(step)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            count += 1
            done = step + 1
            if done % task.log_every_steps == 0 or done == task.total_steps:
                means = mean_over_ranks({n: v / count for n, v in sums.items()})
                elapsed = time.perf_counter() - tick
                last_row = {"step": done, "images_seen": done * task.images_per_step,
                            "images_per_s": count * task.images_per_step / max(elapsed, 1e-9),
                            **{n: float(v) for n, v in means.items()}}
                if runtime.is_main:
                    append_metrics(task.run_dir, last_row)
                bar.update(done, "  ".join(
                    f"{n}={v:.4g}" for n, v in last_row.items() if n not in ("step", "images_seen")))
                sums, count, tick = {}, 0, time.perf_counter()
            else:
                bar.update(done)
            stopping = _any_rank_stopping(flag["stop"], runtime)
            if done % task.checkpoint_every_steps == 0 or done == task.total_steps or stopping:
                checkpoint = _save(task, done, runtime)
            if stopping:
                raise TrainingInterrupted(done, checkpoint)
    if checkpoint is None and runtime.is_main:
        ckpt = latest_checkpoint(task.run_dir / "checkpoints")
        checkpoint = ckpt.path if ckpt else None
    return {"steps": task.total_steps, "resumed_from_step": start,
            "images_seen": task.total_steps * task.images_per_step,
            "wall_time_s": round(time.perf_counter() - began, 3),
            "final_metrics": last_row, "checkpoint": str(checkpoint) if checkpoint else None}
