"""`traflow bench`: throughput and latency of teacher and student, against a measured peak.

Every number in one report comes from the same process on the same device, so ratios between
rows are meaningful even on a noisy machine; absolute numbers are only as good as the machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from traflow_cli.api import load_student, load_teacher
from traflow_cli.engine.ema import make_ema
from traflow_cli.engine.runtime import Runtime
from traflow_cli.flow import rectified_flow_loss, time_grid, trajectory_on_grid
from traflow_cli.jobs.common import sample_shape
from traflow_cli.jobs.distill import traflow_config
from traflow_cli.nets import build_net, student_from_teacher
from traflow_cli.sampling import sample_student, sample_teacher, student_times
from traflow_cli.seeding import generator_for
from traflow_cli.specs import RunSpec
from traflow_cli.traflow import call_net, draw_times, traflow_loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in seconds, after warm-up calls (compilation, caches)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_tflops(runtime: Runtime, repeats: int = 5) -> float:
    """Dense matrix-multiply TFLOP/s on this device in the precision the run uses."""
    cuda = runtime.device.type == "cuda"
    n = 8192 if cuda else 1024
    dtype = runtime.amp_dtype or torch.float32
    a = torch.randn(n, n, device=runtime.device, dtype=dtype)
    b = torch.randn(n, n, device=runtime.device, dtype=dtype)
    seconds = time_call(lambda: a @ b, device=runtime.device, warmup=2, repeats=repeats)
    return 2 * n**3 / seconds / 1e12


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call, counted by torch's flop counter (matmul/conv)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _models(spec: RunSpec, teacher_dir: Path | None, student_dir: Path | None,
            runtime: Runtime) -> tuple[nn.Module, nn.Module, dict]:
    """Trained models if given; otherwise the preset's architecture with fresh weights
    (throughput does not depend on the weights' values)."""
    if teacher_dir is not None:
        teacher = load_teacher(teacher_dir, runtime.device)
        config = teacher.config
        teacher_net = teacher.net
    else:
        config = spec.net_config()
        teacher_net = runtime.place(build_net(config)).eval().requires_grad_(False)
    student_net = (load_student(student_dir, runtime.device).net if student_dir is not None
                   else student_from_teacher(teacher_net, config).eval())
    student_net.requires_grad_(False)
    return runtime.place(teacher_net), runtime.place(student_net), config


def bench(spec: RunSpec, *, teacher_dir: Path | None, student_dir: Path | None,
          runtime: Runtime) -> dict[str, Any]:
    """Images/s, latency, GFLOP per image and achieved TFLOP/s for sampling and training."""
    cfg = spec.bench
    teacher_net, student_net, config = _models(spec, teacher_dir, student_dir, runtime)
    batch = cfg.batch_size
    shape = sample_shape(config)
    gen = generator_for(spec.seed, 8, device=runtime.device)
    noise = runtime.place_batch(torch.randn((batch, *shape), generator=gen, device=gen.device))
    num_classes = config.get("num_classes", 0)
    labels = (torch.arange(batch, device=runtime.device) % num_classes) if num_classes else None
    teacher_fn = runtime.maybe_compile(teacher_net)
    student_fn = runtime.maybe_compile(student_net)
    ones = torch.ones(batch, device=runtime.device)
    with runtime.autocast():
        flops_teacher = count_flops(lambda: call_net(teacher_net, noise, ones, labels=labels))
        flops_student = count_flops(lambda: call_net(student_net, noise, ones, ones, labels))
    peak = matmul_peak_tflops(runtime)
    rows: list[dict[str, Any]] = []

    def add(model: str, task: str, nfe: int, seconds: float, flops: float, **extra: Any) -> None:
        achieved = flops / seconds / 1e12
        rows.append({"model": model, "task": task, "nfe": nfe, "batch": batch,
                     "images_per_s": batch / seconds, "latency_ms": 1e3 * seconds,
                     "gflop_per_image": flops / batch / 1e9, "tflops": achieved,
                     "peak_fraction": achieved / peak if peak > 0 else None, **extra})

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return call_net(teacher_fn, x, t, labels=labels)

    timing = {"device": runtime.device, "warmup": cfg.warmup, "repeats": cfg.repeats}
    with torch.no_grad(), runtime.autocast():
        for nfe in cfg.student_nfe:
            times = student_times(nfe)
            seconds = time_call(lambda t=times: sample_student(student_fn, noise, t, labels=labels),
                                **timing)
            add("student", "sample", nfe, seconds, nfe * flops_student)
        for steps in cfg.teacher_steps:
            seconds = time_call(lambda n=steps: sample_teacher(velocity, noise, steps=n), **timing)
            add("teacher", "sample", steps, seconds, steps * flops_teacher, solver="euler")
        if cfg.rk45:
            _, nfe = sample_teacher(velocity, noise, solver="rk45")
            seconds = time_call(lambda: sample_teacher(velocity, noise, solver="rk45"),
                                device=runtime.device, warmup=0, repeats=1)
            add("teacher", "sample", nfe, seconds, nfe * flops_teacher, solver="rk45")
    if cfg.train:
        _train_rows(spec, teacher_net, config, noise, labels, runtime, add)
    return {"device": _device_name(runtime.device), "matmul_peak_tflops": peak,
            "precision": str(runtime.amp_dtype or torch.float32).removeprefix("torch."),
            "compiled": runtime.compile, "rows": rows}


def _train_rows(spec: RunSpec, teacher_net: nn.Module, config: dict, noise: Tensor,
                labels: Tensor | None, runtime: Runtime,
                add: Callable[..., None]) -> None:
    """One teacher training step (rectified flow) and one TraFlow step, forward + backward + Adam."""
    cfg, tf = spec.bench, traflow_config(spec.distill)
    batch = noise.shape[0]
    gen = generator_for(spec.seed, 9, device=runtime.device)
    data = noise.flip(0)  # any tensor of the data's shape: speed does not depend on its values

    learner = runtime.place(build_net(config)).train()
    learner.load_state_dict(teacher_net.state_dict())
    opt = torch.optim.Adam(learner.parameters(), lr=1e-9, fused=runtime.device.type == "cuda")
    learner_fn = runtime.maybe_compile(learner)

    def teacher_step() -> None:
        t = torch.rand(batch, generator=gen, device=gen.device).to(runtime.device)
        with runtime.autocast():
            vel = (learner_fn if labels is None
                   else lambda x, s: learner_fn(x, s, class_labels=labels))
            loss = rectified_flow_loss(vel, noise, data, t).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    student = student_from_teacher(teacher_net, config).train().requires_grad_(True)
    target = make_ema(student)
    s_opt = torch.optim.Adam(student.parameters(), lr=1e-9, fused=runtime.device.type == "cuda")
    student_fn = runtime.maybe_compile(student)
    grid = time_grid(tf.grid_steps, device=runtime.device)
    teacher_velocity = (teacher_net if labels is None
                        else lambda x, t: teacher_net(x, t, class_labels=labels))
    cached = None
    if spec.distill.trajectory_cache:  # as in training: the teacher's solve was paid up front
        with runtime.autocast():
            cached = trajectory_on_grid(teacher_velocity, noise,
                                        torch.zeros(batch, dtype=torch.long,
                                                    device=runtime.device), grid,
                                        method=tf.teacher_solver)

    def distill_step() -> None:
        times = draw_times(tf, batch, gen)
        with runtime.autocast():
            loss = traflow_loss(student_fn, target, teacher_velocity, noise, config=tf,
                                times=times, data=data, labels=labels,
                                last_layer=student.output_layer.weight, trajectory=cached)
        loss.total.backward()
        s_opt.step()
        s_opt.zero_grad(set_to_none=True)

    timing = {"device": runtime.device, "warmup": max(cfg.warmup, 1), "repeats": cfg.repeats}
    for model, step, objective in (("teacher", teacher_step, "rectified flow"),
                                   ("student", distill_step, "traflow")):
        flops = count_flops(step)
        add(model, "train", 1, time_call(step, **timing), flops, objective=objective)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
