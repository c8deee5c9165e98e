"""benchmarks/gpu_check.sh --cpu: every stage of the CUDA check, at toy sizes on the CPU, so
that the script a GPU session runs in one call cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"teacher", "distill", "sampling", "training", "sample", "options"}


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_stage(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["ok"] and summary["mode"] == "cpu" and set(summary["stages"]) == STAGES
    stages = summary["stages"]
    for job in ("teacher", "distill"):  # killed mid-run, resumed, equal to an uninterrupted run
        record = stages[job]
        assert record["losses_finite"] and record["max_rel_diff"] == 0.0
        assert 0 < record["killed_at_step"] <= record["resumed_from_step"]
    sampling = {(r["model"], r["solver"], r["nfe"]) for r in stages["sampling"]["rows"]}
    assert {("student", "jump", n) for n in (1, 2, 4)} <= sampling
    assert {("teacher", "euler", 1), ("teacher", "euler", 4)} <= sampling
    assert any(solver == "rk45" for _, solver, _ in sampling)
    training = [r for r in stages["training"]["rows"] if r["task"] == "train"]
    assert sorted(r.get("teacher_solve", "-") for r in training) == ["-", "cached", "per step"]
    assert stages["sample"]["num_samples"] == 64 and stages["sample"]["samples_per_s"] > 0
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 64
    options = stages["options"]
    assert options["runtimes"]["compile_off_fp32"]["precision"] == "float32"
    assert options["compile_speedup"].keys() == options["bf16_speedup"].keys()
    assert len(options["compile_speedup"]) == 5  # 2 sampling rows, 3 training rows
