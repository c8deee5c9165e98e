"""`traflow teacher train`: a rectified-flow teacher, top to bottom.

`build_teacher_step` makes the one training step that the job's loop runs and `traflow bench`
times (jobs/bench.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from traflow_cli.engine.distributed import wrap_ddp
from traflow_cli.engine.ema import make_ema, update_ema
from traflow_cli.engine.records import write_summary
from traflow_cli.engine.runtime import Runtime
from traflow_cli.flow import rectified_flow_loss, sample_train_times
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
from traflow_cli.nets import build_net
from traflow_cli.runfolder import RunLock, check_output_folder, read_record
from traflow_cli.sampling import teacher_velocity
from traflow_cli.seeding import derive_seed, dropout_seed, generator_for
from traflow_cli.specs import RunSpec, SpecError, TeacherSpec

SECTIONS = ("seed", "data", "net", "teacher")


@dataclass
class TeacherStep:
    """One rectified-flow training step and what it updates: what the job's loop runs and
    `traflow bench` times."""

    net: nn.Module         # the trained weights (plain module; DDP/compile wrap it inside step_fn)
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: Callable[[int], dict[str, Tensor]]

    @property
    def saved_modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "ema": self.ema}


# A bank of coupled pairs for reflow: noise [P, ...], Phi(noise) [P, ...], classes [P] or None.
PairBank = tuple[Tensor, Tensor, Tensor | None]


def build_teacher_step(spec: RunSpec, runtime: Runtime, *, batches: BatchSource | None = None,
                       section: TeacherSpec | None = None, init: nn.Module | None = None,
                       pairs: PairBank | None = None) -> TeacherStep:
    """A network from spec.net, its EMA, its optimiser and `step_fn(step)`: data and noise for
    the step, E||v(x_t, t) - (data - noise)||^2, backward, clipped Adam with the learning-rate
    warm-up, EMA. `batches` replaces the spec's data source. For reflow, `section` is the spec's
    reflow section, `init` the parent whose weights it starts from, and `pairs` the coupled
    (noise, data) it trains on instead of independent draws."""
    cfg = section or spec.teacher
    config = spec.net_config()
    torch.manual_seed(derive_seed(spec.seed, 5))  # initial weights: same for any process count
    net = build_net(config)
    if init is not None:
        net.load_state_dict(init.state_dict())
    net = runtime.place(net)
    ema = make_ema(net)
    params = list(net.parameters())
    optimizer = make_optimizer(params, cfg, runtime)
    model = runtime.maybe_compile(wrap_ddp(net, runtime.device))
    if batches is None and pairs is None:
        batches = make_batch_source(spec.data, seed=spec.seed, global_batch=cfg.batch_size,
                                    runtime=runtime, net_classes=config.get("num_classes", 0))
    rows = rank_rows(cfg.batch_size, runtime)
    shape = sample_shape(config)

    def step_fn(step: int) -> dict[str, Tensor]:
        torch.manual_seed(dropout_seed(spec.seed, runtime.rank, step))
        gen = generator_for(spec.seed, 0, step, device=runtime.device)
        if pairs is None:
            data, labels = batches(step)
            noise = runtime.place_batch(global_normal(shape, cfg.batch_size, rows, gen))
        else:  # reflow: a noise and the parent's output for it, drawn together
            pick = torch.randint(len(pairs[0]), (cfg.batch_size,), generator=gen,
                                 device=gen.device)[rows].to(pairs[0].device)
            noise, data = pairs[0][pick], pairs[1][pick]
            labels = None if pairs[2] is None else pairs[2][pick]
        t = sample_train_times(cfg.batch_size, gen, runtime.device, cfg.t_eps)[rows]
        with runtime.autocast():
            loss = rectified_flow_loss(teacher_velocity(model, labels), noise, data, t).mean()
        loss.backward()
        grad_norm = optimizer_step(optimizer, params, step, cfg)
        update_ema(ema, net, cfg.ema_decay)
        return {"loss": loss.detach(), "grad_norm": grad_norm}

    return TeacherStep(net=net, ema=ema, optimizer=optimizer, step_fn=step_fn)


def train_teacher(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """Train v(x, t) by rectified flow on the spec's data; resumes from run_dir if started."""
    _check_labels(spec)
    saved = read_record(run_dir) if run_dir.is_dir() else None
    if saved is not None and (saved["spec"].get("reflow") or {}).get("parent"):
        raise SpecError(f"--out: {run_dir} holds a reflow run; resume it with 'traflow teacher "
                        "reflow', or choose another --out")
    runtime = runtime_for(spec)
    with claim_run_dir(run_dir, spec, job="teacher", sections=SECTIONS, runtime=runtime) as claim:
        return _train_teacher(spec, claim, runtime)


def _train_teacher(spec: RunSpec, claim: RunClaim, runtime: Runtime) -> dict[str, Any]:
    step = build_teacher_step(spec, runtime)
    claim.write_record()  # the data opened and the network built: the inputs are good
    return run_training("teacher", claim, runtime, spec.teacher, step,
                        net_metadata(spec.net_config(), "teacher"))


def _check_labels(spec: RunSpec) -> None:
    """A class-conditional net trains on labelled data and an unconditional one on unlabelled."""
    classes = spec.net_config().get("num_classes", 0)
    if spec.data.use_labels and not classes:
        raise SpecError("data.use_labels: true needs a class-conditional net; set net.num_classes "
                        "to the number of classes, or data.use_labels=false")
    if classes and not spec.data.use_labels:
        raise SpecError(f"net.num_classes: a class-conditional net ({classes} classes) trains on "
                        "labelled data; set data.use_labels=true, or net.num_classes=0")


def import_teacher(raw: dict[str, Any], path: Path, run_dir: Path, *, image_size: int = 32,
                   use_ema: bool = True) -> dict[str, Any]:
    """Write a teacher run folder from an official Rectified Flow checkpoint, checked in full.

    `raw` is the merged, not yet validated spec dict (a preset and overrides); its `net` becomes
    the checkpoint's network before it is validated.

    Re-importing into a folder written by an earlier import replaces it; a folder holding any
    other run (a trained teacher, a student, samples) is refused rather than overwritten.
    """
    from traflow_cli.interop import read_rectified_flow_checkpoint
    from traflow_cli.specs import build_spec

    check_import_target(run_dir)  # before reading a large file; again under the lock below
    config, state = read_rectified_flow_checkpoint(path, image_size=image_size, use_ema=use_ema)
    net_config = {"kind": "ncsnpp", **config}
    spec = build_spec({**raw, "net": net_config})  # one line per field
    net = build_net(net_config)
    net.load_state_dict(state)  # strict: every name and shape was checked by the reader too
    metadata = net_metadata(spec.net_config(), "teacher", source=str(path),
                            weights="ema" if use_ema else "raw")
    summary = {"job": "teacher-import", "source": str(path),
               "parameters": sum(p.numel() for p in net.parameters()), **config}
    return write_teacher_import(run_dir, spec, net.state_dict(), metadata, summary)


def write_teacher_import(run_dir: Path, spec: RunSpec, weights: dict[str, Tensor],
                         metadata: dict[str, str], summary: dict[str, Any]) -> dict[str, Any]:
    """An imported teacher's run folder: spec.json, one checkpoint (the weights as `ema`) and
    summary.json, written under the folder's lock once the file has been checked in full."""
    from traflow_cli.engine.checkpoint import save_checkpoint
    from traflow_cli.engine.records import write_spec_record

    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        check_import_target(run_dir)  # again: another process may have started meanwhile
        write_spec_record(run_dir, job="teacher", spec=spec.model_dump(mode="json"),
                          fingerprint=spec.fingerprint(SECTIONS))
        ckpt = save_checkpoint(run_dir / "checkpoints", step=0, modules={"ema": weights},
                               trainer_state={}, metadata=metadata)
        summary = {**summary, "checkpoint": str(ckpt)}
        write_summary(run_dir, summary)
    return summary


def check_import_target(run_dir: Path) -> None:
    """An import may replace an earlier import, never a run that trained (it has metrics)."""
    saved = check_output_folder(run_dir, "teacher")
    if saved is not None and (run_dir / "metrics.jsonl").exists():
        raise SpecError(f"--out: {run_dir} already holds a trained teacher; importing would "
                        "overwrite it; choose another --out")
