"""The CIFAR-10 CPU study's pipeline, shortened to a few steps of everything, stays runnable and
resumable (the full study is docs/RESULTS.md; it is not part of CI)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from conftest import SHARED

ZIP = SHARED / "data" / "cifar10-jpeg-test.zip"  # the same layout as the training zip, 10k images
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar10_cpu_study.sh"


@pytest.mark.slow
@pytest.mark.skipif(not ZIP.is_file(), reason="no shared CIFAR-10 zip")
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
