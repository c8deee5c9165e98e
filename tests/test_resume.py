"""A distillation killed mid-run and re-run on its folder ends bit-identical to one left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


def _damage(out: Path, fault: str) -> None:
    """Injure the newest checkpoint (step 20) the way the fault probe did."""
    folder = out / "checkpoints"
    weights = folder / "step-000000020.safetensors"
    if fault == "ff-inside-tensors":  # 4 KiB of 0xff in the tensor data, header intact
        data = bytearray(weights.read_bytes())
        start = 8 + int.from_bytes(data[:8], "little") + 512
        data[start:start + 4096] = b"\xff" * 4096
        weights.write_bytes(bytes(data))
    elif fault == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif fault == "random-state":
        state = folder / "step-000000020.state.pt"
        state.write_bytes(os.urandom(state.stat().st_size))
    elif fault == "killed-before-manifest":  # what SIGKILL between two writes leaves
        (folder / "step-000000020.manifest.json").unlink()
        (folder / "latest").write_text("step-000000015\n")
        (folder / f".step-000000025.safetensors.tmp-{os.getpid()}").write_bytes(b"half")
    elif fault == "garbage-latest":
        (folder / "latest").write_bytes(os.urandom(64))
    else:
        raise ValueError(fault)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["ff-inside-tensors", "truncated-weights", "random-state",
                                   "killed-before-manifest", "garbage-latest"])
def test_a_damaged_checkpoint_is_passed_over_and_the_run_ends_identical(
        fault: str, toy_teacher: Path, tmp_path: Path, uninterrupted: dict) -> None:
    out = tmp_path / "student"
    half = [a if a != "40" else "20" for a in ARGS]
    assert invoke("distill", "--teacher", toy_teacher, "--out", out, *half).exit_code == 0
    _damage(out, fault)
    result = invoke("distill", "--teacher", toy_teacher, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    if fault == "garbage-latest":  # the pointer is only a hint: nothing was damaged
        assert not warnings
    else:
        assert len(warnings) == 1 and "step-000000020" in warnings[0], result.stderr
        assert (out / "checkpoints" / "damaged" / "step-000000020.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".*tmp*"))  # leftovers of killed writes swept
    _assert_identical(_final_weights(out), uninterrupted)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no row written twice


@pytest.mark.slow
def test_when_every_checkpoint_is_damaged_the_error_is_one_line(toy_teacher: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "student"
    half = [a if a != "40" else "10" for a in ARGS]
    assert invoke("distill", "--teacher", toy_teacher, "--out", out, *half).exit_code == 0
    for weights in (out / "checkpoints").glob("step-*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    for command in (["distill", "--teacher", toy_teacher, "--out", out, *ARGS], ["sample", out]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no usable checkpoint" in lines[0], result.stderr
        assert "step-000000010" in lines[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing moved


@pytest.mark.slow
def test_sampling_a_student_with_a_damaged_newest_checkpoint_uses_the_previous(
        toy_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    half = [a if a != "40" else "20" for a in ARGS]
    assert invoke("distill", "--teacher", toy_teacher, "--out", out, *half).exit_code == 0
    _damage(out, "ff-inside-tensors")
    result = invoke("sample", out, "-n", "100", "--out", tmp_path / "samples", "--json")
    assert result.exit_code == 0, result.output
    assert "step-000000020" in result.stderr and "using" in result.stderr
    assert json.loads(result.stdout)["checkpoint"] == "step-000000015.safetensors"
    points = np.load(tmp_path / "samples" / "samples.npz")["points"]
    assert np.isfinite(points).all()


@pytest.mark.slow
def test_a_second_process_is_refused_while_the_first_trains(tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    args = ["teacher", "train", "--out", str(out), "--steps", "100000", "--device", "cpu",
            "--set", "net.hidden=64", "--set", "teacher.log_every_steps=10",
            "--set", "teacher.checkpoint_every_steps=50"]
    proc = subprocess.Popen([sys.executable, "-m", "traflow_cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(out, proc)
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {proc.pid}" in lines[0], result.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer: every row once


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["flipped-bytes", "truncated"])
def test_a_damaged_trajectory_cache_is_solved_again_and_the_run_ends_identical(
        fault: str, toy_teacher: Path, tmp_path: Path, uninterrupted: dict) -> None:
    out = tmp_path / "student"
    half = [a if a != "40" else "20" for a in ARGS]
    assert invoke("distill", "--teacher", toy_teacher, "--out", out, *half).exit_code == 0
    cache = out / "teacher_trajectories.safetensors"
    data = bytearray(cache.read_bytes())
    if fault == "flipped-bytes":  # inside the tensors: the header still parses
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    else:
        del data[len(data) // 3:]
    cache.write_bytes(bytes(data))
    result = invoke("distill", "--teacher", toy_teacher, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "teacher_trajectories" in warnings[0], result.stderr
    assert "solving the teacher's trajectories again" in warnings[0]
    _assert_identical(_final_weights(out), uninterrupted)
