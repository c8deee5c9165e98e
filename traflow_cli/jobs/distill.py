"""`traflow distill`: TraFlow distillation of a teacher run into a few-step student."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from traflow_cli.engine.checkpoint import run_checkpoint
from traflow_cli.engine.distributed import all_mean, gather_shards, rank, shard, unwrap, wrap_ddp
from traflow_cli.engine.ema import make_ema, update_ema
from traflow_cli.engine.loop import TrainTask, train
from traflow_cli.engine.records import atomic_write_bytes, write_summary
from traflow_cli.engine.runtime import Runtime
from traflow_cli.flow import time_grid, trajectory_on_grid
from traflow_cli.jobs.batches import global_normal, make_batch_source
from traflow_cli.jobs.common import (
    RunClaim,
    claim_run_dir,
    make_optimizer,
    net_metadata,
    optimizer_step,
    rank_rows,
    runtime_for,
    sample_shape,
)
from traflow_cli.models import load_teacher
from traflow_cli.nets import student_from_teacher
from traflow_cli.sampling import teacher_velocity
from traflow_cli.seeding import derive_seed, generator_for
from traflow_cli.specs import DistillSpec, RunSpec, SpecError, check_teacher_run
from traflow_cli.traflow import TraFlowConfig, draw_times, traflow_loss

SECTIONS = ("seed", "data", "net", "distill")


def traflow_config(cfg: DistillSpec) -> TraFlowConfig:
    """The method's own config from the spec section of the same field names."""
    return TraFlowConfig(
        grid_steps=cfg.grid_steps, teacher_solver=cfg.teacher_solver, start=cfg.start,
        w_out=cfg.w_out, w_vel=cfg.w_vel, w_sc=cfg.w_sc, w_fm=cfg.w_fm,
        lambda_vel=None if cfg.lambda_vel == "adaptive" else float(cfg.lambda_vel),
        lambda_clip=cfg.lambda_clip, distance=cfg.distance, huber_c=cfg.huber_c,
        derivative=cfg.derivative, fd_step=cfg.fd_step)


def check_teacher_net(spec: RunSpec) -> None:
    """The spec's network must be the teacher checkpoint's: the student copies it (the CLI puts
    the teacher's network into the spec before validation; this catches any other caller)."""
    check_teacher_run(spec.distill.teacher)
    config = run_checkpoint(Path(spec.distill.teacher)).net_config()
    if config != spec.net_config():
        differ = sorted(k for k in set(config) | set(spec.net_config())
                        if config.get(k) != spec.net_config().get(k))
        raise SpecError(f"net: differs from the teacher's network in {spec.distill.teacher} "
                        f"({', '.join(f'net.{k}' for k in differ[:4])}); the student takes its "
                        "teacher's network: resolve the spec with the teacher's net section")


def teacher_trajectories(teacher: Any, shape: tuple[int, ...], *, count: int, seed: int,
                         tf: TraFlowConfig, device: torch.device, cache_file: Path,
                         batch: int = 4096, num_classes: int = 0
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
    """A bank of `count` noises, their teacher trajectories [N + 1, count, ...] and, for a
    class-conditional teacher, the class [count] each was solved for; kept on disk.

    Paying the teacher's solve once and reusing it every step is what makes data-free
    distillation cheap (METHOD.md, "Cost per step").
    """
    from safetensors.torch import load_file, save

    if cache_file.is_file():
        saved = load_file(cache_file)
        labels = saved["labels"].to(device) if "labels" in saved else None
        return saved["noise"].to(device), saved["trajectory"].to(device), labels
    noise = torch.randn((count, *shape), generator=generator_for(seed, 3)).to(device)
    labels = (torch.randint(num_classes, (count,), generator=generator_for(seed, 3, 1)).to(device)
              if num_classes else None)
    grid = time_grid(tf.grid_steps, device=device)
    # Under DDP each rank solves its share of the rows, then every rank gets all of them.
    mine = shard(count)
    parts = [trajectory_on_grid(teacher_velocity(teacher, None if labels is None else
                                                 labels[mine][start:start + batch]),
                                chunk, torch.zeros(len(chunk), dtype=torch.long, device=device),
                                grid, method=tf.teacher_solver)
             for start, chunk in zip(range(0, count, batch), noise[mine].split(batch),
                                     strict=False)]
    empty = noise.new_empty((tf.grid_steps + 1, 0, *shape))
    trajectory = gather_shards(torch.cat(parts or [empty], dim=1), count, dim=1)
    if rank() == 0:
        arrays = {"noise": noise.cpu().contiguous(), "trajectory": trajectory.cpu().contiguous()}
        if labels is not None:
            arrays["labels"] = labels.cpu().contiguous()
        atomic_write_bytes(cache_file, save(arrays))
    return noise, trajectory, labels


def distill(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """Distill spec.distill.teacher into a student; resumes from run_dir if started."""
    check_teacher_net(spec)
    runtime = runtime_for(spec)
    with claim_run_dir(run_dir, spec, job="distill", sections=SECTIONS, runtime=runtime) as claim:
        return _distill(spec, claim, runtime)


def _distill(spec: RunSpec, claim: RunClaim, runtime: Runtime) -> dict[str, Any]:
    run_dir = claim.run_dir
    cfg, tf = spec.distill, traflow_config(spec.distill)
    config = spec.net_config()
    teacher_net = runtime.place(load_teacher(cfg.teacher).net)
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
    shape = sample_shape(config)
    needs_data = cfg.start == "data" or cfg.w_fm > 0
    batches = (make_batch_source(spec.data, seed=spec.seed, global_batch=cfg.batch_size,
                                 runtime=runtime) if needs_data else None)
    # A class-conditional teacher needs a class for every solve: the data's labels when the
    # loss reads data, else classes drawn uniformly (data-free), stored with any cached solve.
    num_classes = config.get("num_classes", 0)
    data_labels = needs_data and spec.data.use_labels and num_classes > 0
    if data_labels and cfg.trajectory_cache:
        raise SpecError("distill.trajectory_cache: cached solves carry their own classes, which "
                        "the data's labels would contradict; set distill.trajectory_cache=0 or "
                        "data.use_labels=false")
    claim.write_record()  # the teacher loaded, the data opened, the student built
    bank = None
    if cfg.trajectory_cache:
        bank = teacher_trajectories(teacher, shape, count=cfg.trajectory_cache, seed=spec.seed,
                                    tf=tf, device=runtime.device, num_classes=num_classes,
                                    cache_file=run_dir / "teacher_trajectories.safetensors")

    def step_fn(step: int) -> dict[str, Tensor]:
        torch.manual_seed(derive_seed(spec.seed, runtime.rank, step))  # dropout
        gen = generator_for(spec.seed, 0, step, device=runtime.device)
        times = draw_times(tf, cfg.batch_size, gen).rows(rows)
        trajectory = labels = None
        if bank is not None:
            pick = torch.randint(len(bank[0]), (cfg.batch_size,), generator=gen,
                                 device=gen.device)[rows].to(runtime.device)
            noise, trajectory = bank[0][pick], bank[1][:, pick]
            labels = None if bank[2] is None else bank[2][pick]
        else:
            noise = runtime.place_batch(global_normal(shape, cfg.batch_size, rows, gen))
            if num_classes and not data_labels:
                labels = torch.randint(num_classes, (cfg.batch_size,), generator=gen,
                                       device=gen.device)[rows].to(runtime.device)
        data, batch_labels = batches(step) if batches is not None else (None, None)
        if data_labels:
            labels = batch_labels
        with runtime.autocast():
            loss = traflow_loss(model, target, teacher_velocity(teacher, labels), noise,
                                config=tf, times=times, data=data, labels=labels,
                                last_layer=last_layer, trajectory=trajectory, grad_mean=all_mean)
        loss.total.backward()
        grad_norm = optimizer_step(optimizer, params, step, cfg)
        update_ema(target, student, cfg.target_ema)
        update_ema(ema, student, cfg.ema_decay)
        return {"loss": loss.total.detach(), "grad_norm": grad_norm,
                **{f"loss_{name}" if name != "lambda_vel" else name: value
                   for name, value in loss.terms.items()}}

    task = TrainTask(
        run_dir=run_dir, title="distill", saved_modules={"net": student, "target": target,
                                                         "ema": ema},
        optimizer=optimizer, step_fn=step_fn, total_steps=cfg.duration_steps,
        images_per_step=cfg.batch_size,
        metadata=net_metadata(config, "student", teacher=str(cfg.teacher)),
        log_every_steps=cfg.log_every_steps, checkpoint_every_steps=cfg.checkpoint_every_steps,
        keep_checkpoints=cfg.keep_checkpoints, nonfinite=cfg.nonfinite)
    summary = {"job": "distill", **train(task, runtime)}
    if runtime.is_main:
        write_summary(run_dir, summary)
    return summary
