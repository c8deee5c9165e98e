"""The CIFAR-10 CPU study's pipeline, shortened to a few steps of everything, stays runnable and
resumable (the full study is docs/RESULTS.md; it is not part of CI)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CIFAR10_SAMPLE_ZIP

ZIP = CIFAR10_SAMPLE_ZIP  # 300 test images, in the same layout as the 50k training zip
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar10_cpu_study.sh"
STUDY = SCRIPT.with_suffix(".py")


@pytest.mark.slow
def test_quick_study_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    study = tmp_path / "study"
    # Two workers: rows measured side by side, each on half the threads (how the study runs here).
    command = ["bash", str(SCRIPT), "--quick", "--study-dir", str(study), "--data", str(ZIP),
               "--workers", "2"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((study / "results.json").read_text())
    rows = {r["samples"]: r for r in results["rows"]}
    # --quick keeps one row of each kind (the full study adds Euler 2, 4, 8 and NFE 4).
    assert set(rows) == {"teacher-euler1", "teacher-rk45", "student-nfe1", "student-nfe2"}
    assert results["complete"] is True
    assert all(math.isfinite(r["fid"]) and r["num_samples"] == 8 for r in rows.values())
    assert [rows[f"student-nfe{k}"]["nfe"] for k in (1, 2)] == [1, 2]
    assert rows["teacher-rk45"]["psnr_vs_rk45_db"] == math.inf  # its own reference
    assert (study / "grid.png").is_file() and "| student | jump | 1 |" in (
        study / "results.md").read_text()
    timings = json.loads((study / "timings.json").read_text())
    # A second run finds every stage finished and redoes none of them.
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((study / "timings.json").read_text()) == timings
    assert "traflow" not in again.stderr  # no stage command was started
    # A finished student measured as it is (the shipped one, say), on the rows asked for alone.
    other = tmp_path / "other"
    done = subprocess.run(["bash", str(SCRIPT), "--quick", "--study-dir", str(other), "--data", str(ZIP),
                           "--teacher", str(study / "teacher"), "--student", str(study / "student"),
                           "--rows", "student-nfe1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((other / "results.json").read_text())
    assert [r["samples"] for r in results["rows"]] == ["student-nfe1"] and results["complete"]
    assert results["rows"][0]["fid"] == pytest.approx(rows["student-nfe1"]["fid"], rel=1e-6)
    assert " distill " not in done.stderr and not (other / "student").exists()
    # The same folder asked to measure another model stops, rather than report the old samples.
    done = subprocess.run(["bash", str(SCRIPT), "--quick", "--study-dir", str(other), "--data",
                           str(ZIP), "--teacher", str(study / "teacher"), "--student",
                           str(study / "teacher"), "--rows", "student-nfe1"],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == (
        f"[study] {other / 'samples' / 'student-nfe1'} was made from {study / 'student'}, not "
        f"{study / 'teacher'}; use another --study-dir, or delete "
        f"{other / 'samples' / 'student-nfe1'} to measure again")


def test_study_needs_data_and_names_how_to_give_it(tmp_path: Path) -> None:
    """No --data and no torchvision copy: one line saying what to pass (nothing outside the repo
    is looked for), before any stage runs."""
    env = {**os.environ, "TRAFLOW_DATA": str(tmp_path / "empty")}
    command = [sys.executable, str(STUDY), "--study-dir", str(tmp_path / "study")]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"--data: no CIFAR-10 given and no torchvision copy at "
        f"{tmp_path / 'empty' / 'cifar10' / 'cifar-10-batches-py'}; pass --data with an EDM-layout "
        "zip or torchvision's cifar-10-batches-py"]
    assert not (tmp_path / "study").exists()
    done = subprocess.run([*command, "--data", str(tmp_path / "none.zip")], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 1 and done.stderr.startswith(f"--data: nothing at {tmp_path}")
    # A row that does not exist, or a run that never finished: one line each, before any work.
    done = subprocess.run([*command, "--data", str(ZIP), "--rows", "student-nfe3"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 1 and done.stderr.startswith("--rows: unknown row student-nfe3; "
                                                           "choose from student-nfe1, ")
    done = subprocess.run([*command, "--data", str(ZIP), "--rows", "student-wsc0-nfe1",
                           "--no-ablations"], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and done.stderr.strip() == (
        "--rows: student-wsc0-nfe1 not in this study's plan (--quick keeps four rows, "
        "--no-ablations drops the ablations)")
    done = subprocess.run([*command, "--data", str(ZIP), "--student", str(tmp_path)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 1 and done.stderr.strip() == (
        f"--student: {tmp_path} is not a finished run folder (no summary.json); pass a run "
        "folder that train or distill completed")
    assert not (tmp_path / "study").exists()


def test_study_defaults_to_torchvisions_copy(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("cifar10_cpu_study", STUDY)
    study = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, study)  # its dataclasses look themselves up there
    spec.loader.exec_module(study)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    monkeypatch.setenv("TRAFLOW_DATA", str(tmp_path))
    assert study.resolve_data(None) == folder.resolve()
    assert study.resolve_data(ZIP) == ZIP.resolve()


@pytest.mark.slow
def test_every_row_samples_the_same_noises_whatever_seed_its_model_was_trained_with(
        tmp_path: Path) -> None:
    # The shipped student as if distilled with --seed 1: its own seed would draw other noises
    # than the teacher's RK45 row, and PSNR against RK45 would compare unrelated images (~10 dB).
    models = Path(__file__).resolve().parents[1] / "models" / "cifar10-cpu"
    student = tmp_path / "student-seed1"
    shutil.copytree(models / "student", student)
    record = json.loads((student / "spec.json").read_text())
    record["spec"]["seed"] = 1
    (student / "spec.json").write_text(json.dumps(record))
    study = tmp_path / "study"
    done = subprocess.run(["bash", str(SCRIPT), "--quick", "--study-dir", str(study), "--data",
                           str(ZIP), "--teacher", str(models / "teacher"), "--student", str(student),
                           "--rows", "student-nfe1,teacher-rk45"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["samples"]: r for r in json.loads((study / "results.json").read_text())["rows"]}
    assert rows["student-nfe1"]["psnr_vs_rk45_db"] > 25  # ~31 dB on the study's own noises
