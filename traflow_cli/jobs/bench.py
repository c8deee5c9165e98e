"""`traflow bench`: throughput and latency of teacher and student, against a measured peak.

Every number in one report comes from the same process on the same device, so ratios between
rows are meaningful even on a noisy machine; absolute numbers are only as good as the machine.
Rows: student sampling at each NFE, teacher sampling with Euler at each step count and with
adaptive RK45, one teacher training step (rectified flow) and one TraFlow distillation step,
each as the jobs run them (same optimiser, clipping, EMA updates, runtime options).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from traflow_cli.engine.ema import make_ema, update_ema
from traflow_cli.engine.runtime import Runtime
from traflow_cli.flow import rectified_flow_loss, sample_train_times, time_grid, trajectory_on_grid
from traflow_cli.jobs.common import make_optimizer, optimizer_step, sample_shape
from traflow_cli.jobs.distill import traflow_config
from traflow_cli.models import load_student, load_teacher
from traflow_cli.nets import build_net, student_from_teacher
from traflow_cli.sampling import sample_student, sample_teacher, student_times, teacher_velocity
from traflow_cli.seeding import derive_seed, generator_for
from traflow_cli.specs import RunSpec
from traflow_cli.traflow import call_net, draw_times, traflow_loss

Row = dict[str, Any]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], *, device: torch.device, warmup: int,
               repeats: int) -> list[float]:
    """Wall time of each of `repeats` calls of fn() in seconds, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_call(fn: Callable[[], Any], *, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in seconds, after warm-up calls (compilation, caches, graphs)."""
    return statistics.median(time_calls(fn, device=device, warmup=warmup, repeats=repeats))


def matmul_peak_tflops(runtime: Runtime, repeats: int = 10) -> float:
    """Dense square matmul TFLOP/s on this device in the run's precision (best of `repeats`).

    Float32 on CUDA uses TF32 when runtime.tf32 is on, as the networks' matmuls do.
    """
    n, inner = (8192, 10) if runtime.is_cuda else (1536, 1)
    dtype = runtime.amp_dtype or torch.float32
    gen = generator_for(0, 7, device=runtime.device)
    a = torch.randn(n, n, device=runtime.device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=runtime.device, dtype=dtype, generator=gen)
    out = torch.empty_like(a)

    def multiply() -> None:
        for _ in range(inner):
            torch.mm(a, b, out=out)

    seconds = min(time_calls(multiply, device=runtime.device, warmup=2, repeats=repeats))
    return 2 * n**3 * inner / seconds / 1e12


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call, counted by torch's flop counter (matmul/conv)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@contextlib.contextmanager
def count_evaluations(modules: dict[str, nn.Module], batch: int) -> Iterator[dict[str, float]]:
    """Network evaluations per image while the block runs: sum of call batch sizes / batch."""
    counts = dict.fromkeys(modules, 0.0)

    def hook(name: str) -> Callable[..., None]:
        def pre(module: nn.Module, args: tuple) -> None:
            counts[name] += args[0].shape[0] / batch
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def bench_models(spec: RunSpec, teacher_dir: Path | None, student_dir: Path | None,
            runtime: Runtime) -> tuple[nn.Module, nn.Module, dict]:
    """Trained models if given; otherwise the preset's architecture with fresh weights
    (throughput does not depend on the weights' values)."""
    torch.manual_seed(derive_seed(spec.seed, 5))
    if teacher_dir is not None:
        teacher = load_teacher(teacher_dir, runtime.device)
        config, teacher_net = teacher.config, teacher.net
    else:
        config = spec.net_config()
        teacher_net = build_net(config)
    teacher_net = runtime.place(teacher_net).eval().requires_grad_(False)
    student_net = (load_student(student_dir, runtime.device).net if student_dir is not None
                   else student_from_teacher(teacher_net, config))
    student_net = runtime.place(student_net).eval().requires_grad_(False)
    return teacher_net, student_net, config


def bench(spec: RunSpec, *, teacher_dir: Path | None, student_dir: Path | None,
          runtime: Runtime) -> dict[str, Any]:
    """Images/s, latency, GFLOP per image and achieved TFLOP/s for sampling and training."""
    cfg = spec.bench
    teacher_net, student_net, config = bench_models(spec, teacher_dir, student_dir, runtime)
    batch = cfg.batch_size
    shape = sample_shape(config)
    gen = generator_for(spec.seed, 8, device=runtime.device)
    noise = runtime.place_batch(torch.randn((batch, *shape), generator=gen, device=gen.device))
    num_classes = config.get("num_classes", 0)
    labels = (torch.arange(batch, device=runtime.device) % num_classes) if num_classes else None
    ones = torch.ones(batch, device=runtime.device)
    with torch.no_grad(), runtime.autocast():
        flops_teacher = count_flops(lambda: call_net(teacher_net, noise, ones, labels=labels))
        flops_student = count_flops(lambda: call_net(student_net, noise, ones, ones, labels))
    peak = matmul_peak_tflops(runtime)
    rows: list[Row] = []

    def add(model: str, task: str, nfe: float, seconds: float, flops: float, **extra: Any) -> None:
        achieved = flops / seconds / 1e12
        rows.append({"model": model, "task": task, "nfe": nfe, "batch": batch,
                     "images_per_s": batch / seconds, "latency_ms": 1e3 * seconds,
                     "gflop_per_image": flops / batch / 1e9, "tflops": achieved,
                     "peak_fraction": achieved / peak if peak > 0 else None, **extra})

    teacher_fn = runtime.maybe_compile(teacher_net)
    student_fn = runtime.maybe_compile(student_net)
    velocity = teacher_velocity(teacher_fn, labels)
    timing = {"device": runtime.device, "warmup": max(cfg.warmup, 1), "repeats": cfg.repeats}
    with torch.no_grad(), runtime.autocast():
        for nfe in cfg.student_nfe:
            times = student_times(nfe).to(runtime.device)
            run = runtime.fixed_shape(
                lambda x, t=times: sample_student(student_fn, x, t, labels=labels))
            add("student", "sample", nfe, time_call(lambda r=run: r(noise), **timing),
                nfe * flops_student, solver="jump")
        for steps in cfg.teacher_steps:
            run = runtime.fixed_shape(
                lambda x, n=steps: sample_teacher(velocity, x, solver="euler", steps=n)[0])
            add("teacher", "sample", steps, time_call(lambda r=run: r(noise), **timing),
                steps * flops_teacher, solver="euler")
        if cfg.rk45:
            # Adaptive: the step size is decided on the host, so it is never graph-captured.
            _, nfe = sample_teacher(velocity, noise, solver="rk45")  # also the warm-up
            seconds = time_call(lambda: sample_teacher(velocity, noise, solver="rk45"),
                                device=runtime.device, warmup=0, repeats=max(1, cfg.repeats // 2))
            add("teacher", "sample", nfe, seconds, nfe * flops_teacher, solver="rk45")
    if cfg.train:
        _train_rows(spec, teacher_net, config, noise, labels, runtime, add)
    return {"device": _device_name(runtime.device), "matmul_peak_tflops": peak,
            "precision": str(runtime.amp_dtype or torch.float32).removeprefix("torch."),
            "compiled": runtime.compile, "runtime": runtime.describe(), "rows": rows}


class TrainingSteps:
    """One teacher training step and one TraFlow step on a fixed batch, as the jobs run them:
    forward, backward, clipped Adam (fused on CUDA), EMA updates, the spec's runtime options.

    `teacher_step(compiled)` / `distill_step(compiled)` run one step through the compiled
    modules (when runtime.compile is on) or the eager ones (which flop and call counters see).
    """

    def __init__(self, spec: RunSpec, teacher_net: nn.Module, config: dict, noise: Tensor,
                 labels: Tensor | None, runtime: Runtime) -> None:
        self.spec, self.runtime, self.noise, self.labels = spec, runtime, noise, labels
        self.tf = traflow_config(spec.distill)
        self.batch = noise.shape[0]
        self.gen = generator_for(spec.seed, 9, device=runtime.device)
        self.data = noise.flip(0)  # any tensor of the data's shape: speed ignores its values
        # Teacher: rectified flow, E||v(x_t, t) - (data - noise)||^2.
        self.learner = runtime.place(build_net(config)).train()
        self.learner.load_state_dict(teacher_net.state_dict())
        self.learner_ema = make_ema(self.learner)
        self.params = list(self.learner.parameters())
        self.opt = make_optimizer(self.params, spec.teacher, runtime)
        # Student: the TraFlow objective with G^- and the evaluation EMA.
        self.teacher_net = teacher_net
        self.student = runtime.place(student_from_teacher(teacher_net, config)).train()
        self.student.requires_grad_(True)
        self.target, self.ema = make_ema(self.student), make_ema(self.student)
        self.s_params = list(self.student.parameters())
        self.s_opt = make_optimizer(self.s_params, spec.distill, runtime)
        self.trajectory = None
        if spec.distill.trajectory_cache:  # as in training: the teacher's solve is paid up front
            with torch.no_grad(), runtime.autocast():
                self.trajectory = trajectory_on_grid(
                    teacher_velocity(teacher_net, labels), noise,
                    torch.zeros(self.batch, dtype=torch.long, device=runtime.device),
                    time_grid(self.tf.grid_steps, device=runtime.device),
                    method=self.tf.teacher_solver)
        self.compiled = {name: runtime.maybe_compile(module) for name, module in
                         (("learner", self.learner), ("student", self.student),
                          ("teacher", teacher_net))}

    def teacher_step(self, compiled: bool = True) -> None:
        net = self.compiled["learner"] if compiled else self.learner
        t = sample_train_times(self.batch, self.gen, self.runtime.device)
        with self.runtime.autocast():
            loss = rectified_flow_loss(teacher_velocity(net, self.labels), self.noise, self.data,
                                       t).mean()
        loss.backward()
        optimizer_step(self.opt, self.params, 0, self.spec.teacher)
        update_ema(self.learner_ema, self.learner, self.spec.teacher.ema_decay)

    def distill_step(self, compiled: bool = True) -> None:
        net = self.compiled["student"] if compiled else self.student
        teacher = self.compiled["teacher"] if compiled else self.teacher_net
        times = draw_times(self.tf, self.batch, self.gen)
        with self.runtime.autocast():
            loss = traflow_loss(net, self.target, teacher_velocity(teacher, self.labels),
                                self.noise, config=self.tf, times=times, data=self.data,
                                labels=self.labels, last_layer=self.student.output_layer.weight,
                                trajectory=self.trajectory)
        loss.total.backward()
        cfg = self.spec.distill
        optimizer_step(self.s_opt, self.s_params, 0, cfg)
        update_ema(self.target, self.student, cfg.target_ema)
        update_ema(self.ema, self.student, cfg.ema_decay)


def _train_rows(spec: RunSpec, teacher_net: nn.Module, config: dict, noise: Tensor,
                labels: Tensor | None, runtime: Runtime, add: Callable[..., None]) -> None:
    """The two training rows: a teacher step and a TraFlow step, images/s and flops."""
    steps = TrainingSteps(spec, teacher_net, config, noise, labels, runtime)
    batch = steps.batch
    timing = {"device": runtime.device, "warmup": max(spec.bench.warmup, 1),
              "repeats": spec.bench.repeats}
    # Flops and evaluations are counted on the eager modules (the counters see every call);
    # the timing runs what the jobs run (compiled when runtime.compile is on).
    with count_evaluations({"net": steps.learner}, batch) as evals:
        flops = count_flops(lambda: steps.teacher_step(compiled=False))
    add("teacher", "train", evals["net"], time_call(steps.teacher_step, **timing), flops,
        solver="rectified flow")
    with count_evaluations({"student": steps.student, "target": steps.target,
                            "teacher": teacher_net}, batch) as evals:
        flops = count_flops(lambda: steps.distill_step(compiled=False))
    add("student", "train", sum(evals.values()), time_call(steps.distill_step, **timing), flops,
        solver="traflow", teacher_solve="cached" if steps.trajectory is not None else "per step",
        evaluations={name: round(value, 3) for name, value in evals.items()})


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
