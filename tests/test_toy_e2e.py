"""The default pipeline end to end: teacher, distill, sample, eval on the toy ring.

A shortened run of the embedded preset (same networks, fewer steps); its student must already
beat the teacher it was distilled from at equal cost: in sliced Wasserstein distance to the ring,
1 NFE at least 4x better than the teacher's 1-step Euler, 2 NFE within 1.5x of its 100 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import invoke


@pytest.mark.slow
def test_default_pipeline_student_beats_the_teachers_few_step_samples(tmp_path: Path) -> None:
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert invoke("teacher", "train", "--out", teacher, "--steps", "1500").exit_code == 0
    result = invoke("distill", "--teacher", teacher, "--out", student, "--steps", "300")
    assert result.exit_code == 0, result.output
    result = invoke("sample", student, "--nfe", "1", "-n", "10000", "--json")
    assert result.exit_code == 0, result.output
    samples = Path(json.loads(result.stdout)["out"]) / "samples.npz"
    result = invoke("eval", "toy", samples, "--teacher", teacher, "--student", student, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    swd = {(r["model"], r.get("nfe")): r["sliced_wasserstein"] for r in rows}
    floor = rows[0]["sliced_wasserstein"]
    teacher_1, teacher_100 = swd[("teacher", 1)], swd[("teacher", 100)]
    student_1, student_2 = swd[("student", 1)], swd[("student", 2)]
    assert student_1 <= teacher_1 / 4, swd
    assert student_2 <= 1.5 * teacher_100, swd
    assert student_1 <= 2 * teacher_100, swd
    assert floor < teacher_100
    assert swd[(str(samples), None)] == pytest.approx(student_1)  # `sample` wrote the same points
    assert (student / "eval" / "eval.png").is_file()
