"""traflow's CUDA check, stage by stage; `benchmarks/gpu_check.sh` runs it (read its header).

Every stage is a `traflow` command as a user types it (run in this process through the CLI app,
except the run that is killed, which is a child process):
  teacher   `teacher train`: every loss finite; a run SIGKILLed after its middle checkpoint and
            re-run on its folder ends equal to an uninterrupted run (bit-identical on the CPU,
            within bf16 tolerance on CUDA);
  distill   `distill` from that teacher, the same checks;
  sampling  `bench` of those runs: student 1/2/4-NFE and teacher Euler/RK45 images/s, with the
            runtime's defaults (CUDA: bf16, channels_last, TF32, torch.compile, CUDA graphs);
  training  `bench` of the teacher's and the distillation's training steps (the jobs' own);
  sample    `sample -n N --nfe 1` of the student: samples/s including the image writes;
  options   `bench` again with runtime.compile=off, and with compile=off and precision=fp32:
            each option's speed-up is a ratio of rows measured on the same machine.
One JSON summary goes to stdout (last line) and to OUT/gpu_check.json; stage output to
OUT/gpu_check.log. Stages run in this order while the time budget lasts; the summary names any
stage that failed or was skipped, and the exit status is 0 only if every stage ran and passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from traflow_cli.cli.app import app

# Sizes per mode. GPU: the cifar10 preset's 61.8M-parameter DDPM++ on the CIFAR-10 zip; CPU: the
# shapes32 preset (images drawn on the fly) with a network small enough for CI.
GPU = {
    "preset": "cifar10", "sample_batch": 1024, "train_batch": 128, "repeats": 3,
    "student_nfe": [1, 2, 4], "teacher_steps": [1, 18],
    "teacher": ["--steps", "160", "--set", "teacher.batch_size=128", "--set",
                "teacher.warmup_steps=0", "--set", "teacher.checkpoint_every_steps=40",
                "--set", "teacher.log_every_steps=10", "--set", "data.preload=false",
                "--set", "runtime.compile=off"],  # compiled steps are timed by the bench
    "distill": ["--steps", "80", "--set", "distill.batch_size=64", "--set",
                "distill.trajectory_cache=256", "--set", "distill.checkpoint_every_steps=20",
                "--set", "distill.log_every_steps=10", "--set", "runtime.compile=off"],
    "kill_after_step": 80, "distill_kill_after_step": 40, "samples": 10_000,
    "resume_rtol": 1e-2,  # bf16 autocast and non-deterministic CUDA kernels: close, not equal
}
TINY_NET = ["--set", "net.nf=8", "--set", "net.ch_mult=[1,2]", "--set", "net.num_res_blocks=1",
            "--set", "net.attn_resolutions=[8]"]
CPU = {
    "preset": "shapes32", "sample_batch": 16, "train_batch": 4,
    "student_nfe": [1, 2, 4], "teacher_steps": [1, 4], "repeats": 1,
    "teacher": ["--steps", "24", *TINY_NET, "--set", "teacher.batch_size=4", "--set",
                "teacher.checkpoint_every_steps=4", "--set", "teacher.log_every_steps=4"],
    "distill": ["--steps", "16", "--set", "distill.batch_size=4", "--set",
                "distill.grid_steps=4", "--set", "distill.trajectory_cache=8", "--set",
                "distill.checkpoint_every_steps=4", "--set", "distill.log_every_steps=4"],
    "kill_after_step": 8, "distill_kill_after_step": 8, "samples": 64,
    "resume_rtol": 0.0,  # float32 on the CPU: every step replays exactly
}
STAGES = ("teacher", "distill", "sampling", "training", "sample", "options")


class Check:
    """Runs the stages, keeps the log and the summary."""

    def __init__(self, mode: str, out: Path, data: Path | None, budget_s: float) -> None:
        self.mode, self.out, self.budget_s = mode, out, budget_s
        self.sizes = GPU if mode == "gpu" else CPU
        self.device = "cuda" if mode == "gpu" else "cpu"
        self.common = ["--device", self.device, "--json"]
        self.data = ["--set", f"data.path={data}"] if data is not None else []
        self.began = time.perf_counter()
        self.trained: dict[str, Any] | None = None  # the training stage's bench report
        self.log = (out / "gpu_check.log").open("a")
        self.summary: dict[str, Any] = {
            "mode": mode, "torch": torch.__version__, "python": sys.version.split()[0],
            "device": torch.cuda.get_device_name() if mode == "gpu" else "cpu",
            "budget_s": budget_s, "stages": {}}

    # --- running commands -------------------------------------------------------------------
    def traflow(self, *args: str) -> dict[str, Any]:
        """`traflow ARGS` in this process; its JSON result (raises on a non-zero exit)."""
        self.write(f"$ traflow {' '.join(args)}")
        result = CliRunner().invoke(app, list(args))
        self.write(result.output)
        if result.exit_code != 0:
            raise RuntimeError(f"traflow {args[0]} exited {result.exit_code}: "
                               f"{(result.output or repr(result.exception)).strip()[-300:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def killed_run(self, args: list[str], run_dir: Path, after_step: int) -> int:
        """Start `traflow ARGS` as a child, SIGKILL it once a checkpoint at or past
        `after_step` exists; returns the step it had saved."""
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        cmd = [sys.executable, "-m", "traflow_cli", *args]
        self.write(f"$ {' '.join(cmd)}  # to be killed after step {after_step}")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        try:
            while (saved := _saved_step(run_dir)) < after_step:
                if proc.poll() is not None:
                    raise RuntimeError(f"the run ended (exit {proc.returncode}) before step "
                                       f"{after_step} could be interrupted")
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        return saved

    def write(self, text: str) -> None:
        self.log.write(text.rstrip() + "\n")
        self.log.flush()

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.began)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {}
        self.summary["stages"][name] = record
        start = time.perf_counter()
        try:
            yield record
            record.setdefault("ok", True)
        except Exception as err:  # a failed stage is reported, and the next one still runs
            record.update(ok=False, error=f"{type(err).__name__}: {err}"[:500])
        finally:
            record["seconds"] = round(time.perf_counter() - start, 1)
            if self.mode == "gpu":
                torch.cuda.empty_cache()

    # --- stages -------------------------------------------------------------------------------
    def resume_stage(self, record: dict[str, Any], job: list[str], args: list[str],
                     name: str, after_step: int) -> Path:
        """An uninterrupted run and a killed-then-resumed run of the same command: every
        logged loss finite, and the final checkpoints equal (within the mode's tolerance)."""
        plain, resumed = self.out / f"{name}-plain", self.out / f"{name}-resumed"
        summary = self.traflow(*job, "--out", str(plain), *args)
        record["killed_at_step"] = self.killed_run([*job, "--out", str(resumed), *args],
                                                   resumed, after_step)
        again = self.traflow(*job, "--out", str(resumed), *args)
        record["resumed_from_step"] = again["resumed_from_step"]
        record["images_per_s"] = summary["final_metrics"].get("images_per_s")
        record["losses_finite"] = _losses_finite(plain) and _losses_finite(resumed)
        record["max_rel_diff"] = _max_rel_diff(_final_weights(plain), _final_weights(resumed))
        record["resume_equal"] = record["max_rel_diff"] <= self.sizes["resume_rtol"]
        record["ok"] = (record["losses_finite"] and record["resume_equal"]
                        and 0 < record["resumed_from_step"] < summary["steps"])
        return plain

    def bench(self, batch: int, *args: str) -> dict[str, Any]:
        return self.traflow("bench", "--preset", self.sizes["preset"], "--batch-size",
                            str(batch), *self.common, *self.data, "--set",
                            f"bench.repeats={self.sizes['repeats']}", *args)

    def run(self, only: set[str]) -> dict[str, Any]:
        s, preset = self.sizes, ["--preset", self.sizes["preset"]]
        teacher = student = None
        for name in STAGES:
            if name not in only:
                continue
            if self.left_s() <= 0:
                self.summary["stages"][name] = {"ok": False, "skipped": "time budget spent"}
                continue
            with self.stage(name) as record:
                if name == "teacher":
                    teacher = self.resume_stage(record, ["teacher", "train"], [
                        *preset, *self.common, *self.data, *s["teacher"]], "teacher",
                        s["kill_after_step"])
                elif name == "distill":
                    if teacher is None:
                        raise RuntimeError("needs the teacher stage")
                    student = self.resume_stage(record, ["distill"], [
                        "--teacher", str(teacher), *preset, *self.common, *self.data,
                        *s["distill"]],
                        "student", s["distill_kill_after_step"])
                elif name == "sampling":
                    report = self.bench(s["sample_batch"], *_runs(teacher, student), *(
                        [] if teacher else _tiny(self.mode)), "--set", "bench.train=false",
                        "--set", f"bench.student_nfe={s['student_nfe']}", "--set",
                        f"bench.teacher_steps={s['teacher_steps']}")
                    record.update(_report(report))
                elif name == "training":
                    self.trained = self.training_bench(teacher, student)
                    record.update(_report(self.trained))
                elif name == "sample":
                    if student is None:
                        raise RuntimeError("needs the distill stage")
                    made = self.traflow("sample", str(student), "--nfe", "1", "-n",
                                        str(s["samples"]), "--out", str(self.out / "samples"),
                                        *self.common)
                    record.update({k: made.get(k) for k in ("num_samples", "seconds",
                                                             "samples_per_s", "nfe")})
                    record["ok"] = made.get("num_samples") == s["samples"]
                elif name == "options":
                    record.update(self.options(teacher, student))
        stages = self.summary["stages"]
        self.summary["ok"] = all(stages.get(n, {}).get("ok") for n in only)
        self.summary["seconds"] = round(time.perf_counter() - self.began, 1)
        return self.summary

    def training_bench(self, teacher: Path | None, student: Path | None,
                       *runtime: str) -> dict[str, Any]:
        """Teacher/distillation training steps, plus 1-step sampling rows (the options stage
        compares the same rows under other runtime settings)."""
        return self.bench(self.sizes["train_batch"], *_runs(teacher, student),
                          *([] if teacher else _tiny(self.mode)), "--set",
                          "bench.student_nfe=[1]", "--set", "bench.teacher_steps=[1]",
                          "--set", "bench.rk45=false", *runtime)

    def options(self, teacher: Path | None, student: Path | None) -> dict[str, Any]:
        """Speed-up of torch.compile (default runtime over compile=off) and of bf16 autocast
        (compile=off over compile=off + fp32), row by row, from three bench runs here."""
        runs = {"default": self.trained or self.training_bench(teacher, student),
                "compile_off": self.training_bench(teacher, student, "--set",
                                                   "runtime.compile=off"),
                "compile_off_fp32": self.training_bench(teacher, student, "--set",
                                                        "runtime.compile=off", "--set",
                                                        "runtime.precision=fp32")}
        speed = {name: {_row_name(r): r["images_per_s"] for r in report["rows"]}
                 for name, report in runs.items()}
        return {"runtimes": {name: report["runtime"] for name, report in runs.items()},
                "images_per_s": speed,
                "compile_speedup": _ratios(speed["default"], speed["compile_off"]),
                "bf16_speedup": _ratios(speed["compile_off"], speed["compile_off_fp32"])}


def _runs(teacher: Path | None, student: Path | None) -> list[str]:
    return ([*(["--teacher", str(teacher)] if teacher else []),
             *(["--student", str(student)] if student else [])])


def _tiny(mode: str) -> list[str]:
    """Without trained runs the bench builds the preset's network: the tiny one on the CPU."""
    return TINY_NET if mode == "cpu" else []


def _row_name(row: dict[str, Any]) -> str:
    parts = [row["model"], row["task"], str(row.get("solver")), f"nfe{row['nfe']:g}"]
    if "teacher_solve" in row:
        parts.append(row["teacher_solve"].replace(" ", "_"))
    return " ".join(parts)


def _ratios(num: dict[str, float], den: dict[str, float]) -> dict[str, float]:
    return {name: round(num[name] / den[name], 3) for name in num if den.get(name)}


def _report(report: dict[str, Any]) -> dict[str, Any]:
    """A bench report's rows, and whether each is sane (positive speed, finite losses)."""
    rows = report["rows"]
    ok = bool(rows) and all(r["images_per_s"] > 0 and math.isfinite(r.get("loss", 0.0) or 0.0)
                            for r in rows)
    return {"ok": ok, "runtime": report["runtime"], "precision": report["precision"],
            "matmul_peak_tflops": report["matmul_peak_tflops"], "rows": rows}


def _saved_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    stem = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / f"{stem}.safetensors")


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of ||a - b|| / ||a|| (0.0 when every tensor is bit-identical)."""
    if a.keys() != b.keys():
        return math.inf
    worst = 0.0
    for key in a:
        diff = float((a[key].double() - b[key].double()).norm())
        worst = max(worst, diff / max(float(a[key].double().norm()), 1e-30) if diff else 0.0)
    return worst


def _losses_finite(run_dir: Path) -> bool:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [v for row in rows for k, v in row.items() if k.startswith("loss")]
    return bool(values) and all(math.isfinite(v) for v in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["gpu", "cpu"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset zip for the GPU mode (the cifar10 preset's data.path)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no stage after this many seconds")
    parser.add_argument("--only", default=",".join(STAGES),
                        help=f"comma-separated stages, of {', '.join(STAGES)}")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if unknown := only - set(STAGES):
        parser.error(f"--only: unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    if args.mode == "gpu" and not torch.cuda.is_available():
        parser.error("--mode gpu: no CUDA device is visible; use --mode cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.mode, args.out.resolve(), args.data, args.budget_s)
    summary = check.run(only)
    text = json.dumps(summary)
    (args.out / "gpu_check.json").write_text(text + "\n")
    print(text)  # noqa: T201 (the script's one result, for whoever runs it)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
