"""`traflow bench`: throughput and latency of teacher and student, against a measured peak.

Every number in one report comes from the same process on the same device, so ratios between
rows are meaningful even on a noisy machine; absolute numbers are only as good as the machine.
Rows: student sampling at each NFE, teacher sampling with Euler at each step count and with
adaptive RK45, the teacher's training step (rectified flow) and the TraFlow distillation step
(with the teacher's solves cached, and solved every step). The training rows time the jobs'
own step functions (jobs/teacher.py build_teacher_step, jobs/distill.py build_distill_step), so
they include exactly what training runs: data, seeding, the loss, backward, the learning-rate
schedule, clipped Adam and the EMA updates, with the spec's runtime options.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from traflow_cli.engine.runtime import Runtime
from traflow_cli.errors import UserError
from traflow_cli.grids import student_times
from traflow_cli.jobs.batches import BatchSource, make_batch_source
from traflow_cli.jobs.common import sample_shape
from traflow_cli.jobs.distill import build_distill_step, cache_allowed, traflow_section
from traflow_cli.jobs.teacher import build_teacher_step
from traflow_cli.models import load_student, load_teacher
from traflow_cli.nets import build_net, student_from_teacher
from traflow_cli.objectives.shared import call_net
from traflow_cli.sampling import sample_student, sample_teacher, teacher_velocity
from traflow_cli.seeding import derive_seed, generator_for
from traflow_cli.specs import RunSpec, SpecError, build_spec

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
        _train_rows(spec, teacher_net, config, runtime, add)
    return {"device": _device_name(runtime.device), "matmul_peak_tflops": peak,
            "precision": str(runtime.amp_dtype or torch.float32).removeprefix("torch."),
            "compiled": runtime.compile, "runtime": runtime.describe(), "rows": rows}


def training_spec(spec: RunSpec, net_config: dict, batch: int) -> RunSpec:
    """The spec the training rows run: the benchmarked network, and the bench's batch size for
    both jobs (so that every row has the same batch); everything else as the jobs read it."""
    merged = spec.model_dump(mode="json")
    merged["net"] = net_config
    merged["teacher"]["batch_size"] = merged["distill"]["batch_size"] = batch
    try:
        return build_spec(merged)
    except SpecError as err:
        raise SpecError(f"bench.batch_size: {batch} does not fit the training steps ({err}); "
                        "choose another --batch-size") from None


def bench_batches(spec: RunSpec, runtime: Runtime, batch: int) -> tuple[BatchSource, str]:
    """The jobs' own data source when the dataset is there ("dataset"); else random tensors of
    the data's shape and classes ("random"): a training step's speed ignores pixel values."""
    try:
        return make_batch_source(spec.data, seed=spec.seed, global_batch=batch, runtime=runtime,
                                 net_classes=spec.net_config().get("num_classes", 0)), "dataset"
    except UserError:
        shape = sample_shape(spec.net_config())
        classes = spec.net_config().get("num_classes", 0)

        def random_batch(step: int) -> tuple[Tensor, Tensor | None]:
            gen = generator_for(spec.seed, 1, step)
            data = torch.rand((batch, *shape), generator=gen) * 2 - 1
            labels = torch.randint(classes, (batch,), generator=gen) if classes else None
            return (runtime.place_batch(data),
                    None if labels is None else labels.to(runtime.device))

        return random_batch, "random"


@dataclass
class BenchedStep:
    """A job's own training step, as its loop runs it, with the modules whose calls are counted."""

    fields: dict[str, Any]                    # what the row says about it (solver, cache, data)
    step_fn: Callable[[int], dict[str, Tensor]]
    counted: dict[str, nn.Module]


def teacher_train_step(spec: RunSpec, runtime: Runtime, batches: BatchSource,
                       data: str) -> BenchedStep:
    """`traflow teacher train`'s step (jobs/teacher.py build_teacher_step)."""
    step = build_teacher_step(spec, runtime, batches=batches)
    return BenchedStep({"solver": "rectified flow", "data": data}, step.step_fn,
                       {"net": step.net})


def distill_train_steps(spec: RunSpec, runtime: Runtime, teacher_net: nn.Module,
                        batches: BatchSource, data: str) -> list[BenchedStep]:
    """`traflow distill`'s step (jobs/distill.py build_distill_step): with the teacher's solves
    cached and solved every step, where the spec allows both. The bench's cache holds one batch
    of trajectories (a step's cost does not depend on how many there are), in memory."""
    batch = spec.distill.batch_size
    caches = [batch, 0] if cache_allowed(spec) else [0]
    steps = []
    for cache in caches:
        variant = spec.model_copy(update={"distill": spec.distill.model_copy(
            update={"trajectory_cache": cache})})
        step = build_distill_step(variant, runtime, teacher_net, cache_file=None, batches=batches)
        steps.append(BenchedStep(
            {"solver": step.method, "teacher_solve": step.teacher_solve, "data": data,
             "derivative": step.derivative, "vel_every": traflow_section(spec.distill).vel_every,
             "draws_per_solve": step.draws_per_solve},
            step.step_fn, {"student": step.student, "target": step.target,
                           "teacher": step.teacher}))
    return steps


def time_steps(step_fns: list[Callable[[int], dict[str, Tensor]]], *, first: int,
               device: torch.device, warmup: int, repeats: int
               ) -> list[tuple[float, dict[str, float]]]:
    """Median seconds of each step_fn(step) over `repeats` steps after `warmup` ones, and its
    last step's metrics. Steps are numbered from `first` (the jobs' learning-rate schedule sees
    the numbers a run would) and the functions take turns, one step each, so that a change of
    load on a shared machine slows every row alike and their ratios stay meaningful."""
    seconds: list[list[float]] = [[] for _ in step_fns]
    metrics: list[dict[str, Tensor]] = [{} for _ in step_fns]
    for n in range(warmup + repeats):
        for fn, times, last in zip(step_fns, seconds, metrics, strict=True):
            _sync(device)
            start = time.perf_counter()
            last.update(fn(first + n))
            _sync(device)
            if n >= warmup:
                times.append(time.perf_counter() - start)
    return [(statistics.median(times), {name: float(v) for name, v in last.items()})
            for times, last in zip(seconds, metrics, strict=True)]


def _train_rows(spec: RunSpec, teacher_net: nn.Module, config: dict, runtime: Runtime,
                add: Callable[..., None]) -> None:
    """A teacher training step and a TraFlow step (cached and per-step teacher solves), each
    the job's own step function: images/s, flops, evaluations per image, the step's loss."""
    batch = spec.bench.batch_size
    spec = training_spec(spec, config, batch)
    eager = dataclasses.replace(runtime, compile=False)
    batches, data = bench_batches(spec, runtime, batch)

    def build(rt: Runtime) -> list[BenchedStep]:
        return [teacher_train_step(spec, rt, batches, data),
                *distill_train_steps(spec, rt, teacher_net, batches, data)]

    timed = build(runtime)
    # Flops and evaluations are counted over one step of eager copies (the counters see every
    # call); the timing runs what the jobs run (compiled when runtime.compile is on).
    counted = timed if not runtime.compile else build(eager)
    counts = []
    for run in counted:
        with count_evaluations(run.counted, batch) as evals:
            flops = count_flops(lambda r=run: r.step_fn(0))
        counts.append((flops, dict(evals)))
    results = time_steps([run.step_fn for run in timed], first=1, device=runtime.device,
                         warmup=max(spec.bench.warmup, 1), repeats=spec.bench.repeats)
    teacher_ips = batch / results[0][0]
    for run, (flops, evals), (seconds, metrics) in zip(timed, counts, results, strict=True):
        extra = dict(run.fields)
        model = "teacher" if "net" in run.counted else "student"
        if model == "student":
            extra["evaluations"] = {name: round(value, 3) for name, value in evals.items()}
            extra["of_teacher_step"] = batch / seconds / teacher_ips
        add(model, "train", sum(evals.values()), seconds, flops, loss=metrics.get("loss"),
            **extra)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
