"""A distillation killed mid-run and re-run on its folder ends bit-identical to one left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import invoke
from safetensors.torch import load_file

ARGS = ["--steps", "40", "--device", "cpu", "--set", "distill.batch_size=128",
        "--set", "distill.checkpoint_every_steps=5", "--set", "distill.log_every_steps=5",
        "--set", "distill.trajectory_cache=2048", "--set", "distill.keep_checkpoints=3"]


def _final_weights(run: Path) -> dict:
    return load_file(run / "checkpoints" / "step-000000040.safetensors")


def _distill_cli(teacher: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "traflow_cli", "distill", "--teacher", str(teacher),
            "--out", str(out), *ARGS]


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, deadline_s: float = 120) -> None:
    start = time.time()
    while not (out / "checkpoints" / "latest").is_file():
        assert proc.poll() is None, "finished before it could be interrupted"
        assert time.time() - start < deadline_s
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(toy_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("plain") / "student"
    result = invoke("distill", "--teacher", toy_teacher, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    return _final_weights(out)


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:  # bit-identical, not merely close: every step is replayed exactly
        assert (a[key] == b[key]).all(), key


@pytest.mark.slow
def test_killed_then_resumed_equals_uninterrupted(toy_teacher: Path, tmp_path: Path,
                                                  uninterrupted: dict) -> None:
    out = tmp_path / "student"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.Popen(_distill_cli(toy_teacher, out), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(out, proc)
    proc.kill()  # SIGKILL: no chance to save anything more
    proc.wait()
    steps_done = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert steps_done < 40
    result = invoke("distill", "--teacher", toy_teacher, "--out", out, *ARGS, "--json")
    assert result.exit_code == 0, result.output
    _assert_identical(_final_weights(out), uninterrupted)


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_and_resumes_identically(toy_teacher: Path, tmp_path: Path,
                                                         uninterrupted: dict) -> None:
    out = tmp_path / "student"
    proc = subprocess.Popen(_distill_cli(toy_teacher, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Re-run the same command to resume" in stderr
    assert "Traceback" not in stderr
    result = invoke("distill", "--teacher", toy_teacher, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    _assert_identical(_final_weights(out), uninterrupted)
