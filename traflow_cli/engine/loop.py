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

from traflow_cli.engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    quarantine_newer,
    save_checkpoint,
)
from traflow_cli.engine.distributed import any_rank, barrier, mean_over_ranks, unwrap
from traflow_cli.engine.progress import ProgressBar
from traflow_cli.engine.records import append_metrics, truncate_metrics
from traflow_cli.engine.runtime import Runtime
from traflow_cli.errors import Interrupted, UserError, one_line


class TrainingDiverged(UserError):
    """The loss or a gradient became NaN or infinite; the last good checkpoint is kept."""


# In "skip" mode, this many bad steps in a row mean the run has diverged, not hiccuped.
MAX_SKIPPED_IN_A_ROW = 20


class TrainingInterrupted(Interrupted):
    """Raised after a stop request has been honoured with a checkpoint."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}. Re-run "
                         "the same command to resume.")
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
    nonfinite: str = "stop"  # "stop" or "skip" (see specs.TrainingSpec.nonfinite)


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


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does: for work with no step to stop after
    (an FID), so that `finally` blocks run and temporaries go, and the CLI says one line and
    exits with code 130 (128 + SIGINT), as the training jobs do on SIGTERM."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def restore(task: TrainTask, runtime: Runtime) -> int:
    """Load the newest checkpoint that verifies, if any; returns the step to continue from.

    Damaged newer checkpoints are moved aside (checkpoints/damaged/), and metrics.jsonl loses
    the rows of steps after the one resumed, so that the resumed run writes them once.
    """
    folder = task.run_dir / "checkpoints"
    ckpt = latest_checkpoint(folder)
    step = 0 if ckpt is None else ckpt.step
    if ckpt is not None:
        for name, module in task.saved_modules.items():
            plain = unwrap(module)
            # Names and shapes checked from the header first: an edited file is one line.
            plain.load_state_dict(ckpt.weights(name, expected=plain.state_dict()))
        state = ckpt.trainer_state()
        try:
            task.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            raise CheckpointError(f"{ckpt.state_path}: its optimizer state does not fit this run "
                                  f"({type(err).__name__}: {one_line(err)[:120]}); restore the "
                                  "file, or resume from an earlier checkpoint") from None
    barrier()  # every rank has read the checkpoint before rank 0 moves anything
    if runtime.is_main:
        if ckpt is not None and ckpt.skipped:
            quarantine_newer(folder, ckpt.step)
        truncate_metrics(task.run_dir, step)
    return step


def _all_finite(metrics: dict[str, Tensor]) -> Tensor:
    """A 0-d bool tensor on the metrics' device (no host sync)."""
    return torch.stack([torch.isfinite(v.detach()).all() for v in metrics.values()]).all()


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


def train(task: TrainTask, runtime: Runtime) -> dict[str, Any]:
    """Run task.step_fn from the last checkpoint to task.total_steps; returns a summary."""
    start = restore(task, runtime)
    last_row: dict[str, Any] = {}
    checkpoint = None
    sums: dict[str, Tensor] = {}
    count = skipped = skipped_in_a_row = 0
    # "stop" mode: the first step whose metrics were not finite, tracked on the device and read
    # only at log ticks and before saves (-1: none yet).
    first_bad = torch.full((), -1, dtype=torch.long, device=runtime.device)
    tick = time.perf_counter()
    began = tick

    def check_finite() -> None:
        bad = int(first_bad) if task.nonfinite == "stop" else -1
        # Decided together, so that no rank waits in a collective for one that stopped.
        if any_rank(bad >= 0 or skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW):
            kept = latest_checkpoint(task.run_dir / "checkpoints")
            saved = (f"nothing after step {kept.step if kept else 0} was saved "
                     f"({kept.path if kept else 'no checkpoint yet'})")
            if bad >= 0:
                raise TrainingDiverged(
                    f"the loss became NaN or infinite at step {bad + 1}; {saved}; lower "
                    f"{task.title}.lr, or set {task.title}.nonfinite='skip' to skip bad steps")
            raise TrainingDiverged(
                f"{skipped_in_a_row} steps in a row up to step {done} had a NaN or infinite loss "
                f"and were skipped: the run has diverged; {saved}; lower {task.title}.lr")

    with stop_requests() as flag, ProgressBar(task.title, task.total_steps, completed=start,
                                              enabled=runtime.is_main,
                                              per_unit=task.images_per_step) as bar:
        for step in range(start, task.total_steps):
            metrics = task.step_fn(step)
            done = step + 1
            finite = _all_finite(metrics) if metrics else torch.ones((), dtype=torch.bool)
            if task.nonfinite == "skip":
                good = bool(finite)  # the optimizer step already synced on the same verdict
                skipped_in_a_row = 0 if good else skipped_in_a_row + 1
                skipped += not good
            else:
                good = True
                first_bad = torch.where((first_bad < 0) & ~finite.to(first_bad.device),
                                        torch.full_like(first_bad, step), first_bad)
            if good:
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float()
                count += 1
            if done % task.log_every_steps == 0 or done == task.total_steps:
                check_finite()
                means = mean_over_ranks({n: v / max(count, 1) for n, v in sums.items()})
                elapsed = time.perf_counter() - tick
                last_row = {"step": done, "images_seen": done * task.images_per_step,
                            "images_per_s": count * task.images_per_step / max(elapsed, 1e-9),
                            **{n: float(v) for n, v in means.items()}}
                if skipped:
                    last_row["skipped_steps"] = skipped
                if runtime.is_main:
                    append_metrics(task.run_dir, last_row)
                bar.update(done, {n: v for n, v in last_row.items()
                                  if n not in ("step", "images_seen", "images_per_s")})
                sums, count, tick = {}, 0, time.perf_counter()
            else:
                bar.update(done)
            # Every rank leaves at the same step, or the others would wait forever in a collective.
            stopping = any_rank(flag["stop"])
            if done % task.checkpoint_every_steps == 0 or done == task.total_steps or stopping:
                check_finite()  # never save weights that a NaN step has touched
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
