"""Progress in a log: where stderr is not a terminal (a file, a pipe: CI, nohup, a cluster job),
a job reports in whole plain lines that a person or a script reads line by line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from traflow_cli.engine import progress
from traflow_cli.engine.progress import ProgressBar, format_eta, format_metrics

# job  step 300/1500  20.0%  images/s 41.2  eta 0:04:51  loss 0.0213  out 0.011 vel 0.004 sc 0.006
LINE = re.compile(r"(?P<job>[\w-]+)  (?P<unit>step|sample|image) (?P<done>\d+)/(?P<total>\d+)  "
                  r"(?P<percent>\d+\.\d)%  (?P<rate_unit>images|samples)/s (?P<rate>\d+\.\d|\?)  "
                  r"eta (?P<eta>\d+:\d\d:\d\d|\?)(?:  (?P<metrics>.+))?")
NUMBER = r"-?(?:\d+\.?\d*(?:e[+-]\d+)?|inf|nan)"
METRICS = re.compile(rf"loss {NUMBER}(?:(?: {{1,2}})\w+ {NUMBER})*")


def parse(line: str) -> dict[str, str]:
    match = LINE.fullmatch(line)
    assert match, f"not a whole progress line: {line!r}"
    return match.groupdict()


def test_a_training_log_through_a_pipe_reads_line_by_line(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "40"}  # a narrow "terminal"
    done = subprocess.run(
        [sys.executable, "-m", "traflow_cli", "teacher", "train", "--out", str(tmp_path / "t"),
         "--steps", "120", "--device", "cpu", "--set", "net.hidden=32",
         "--set", "teacher.batch_size=64", "--set", "teacher.log_every_steps=10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) >= 10, done.stderr  # at least one a tenth of the work
    rows = [parse(line) for line in lines]  # every line whole: nothing else, nothing wrapped
    assert {r["job"] for r in rows} == {"teacher"} and {r["total"] for r in rows} == {"120"}
    steps = [int(r["done"]) for r in rows]
    assert steps == sorted(set(steps)), steps  # increasing
    assert steps[-1] == 120 and rows[-1]["percent"] == "100.0" and rows[-1]["eta"] == "0:00:00"
    for row in rows:
        assert float(row["percent"]) == pytest.approx(100 * int(row["done"]) / 120, abs=0.05)
        assert row["rate_unit"] == "images" and row["rate"] != "?"
        assert METRICS.fullmatch(row["metrics"] or ""), row  # the losses of the last log tick
        assert "grad_norm" in row["metrics"]


def test_a_distillation_line_names_each_loss_term() -> None:
    metrics = {"loss": 0.0213, "grad_norm": 0.35, "loss_out": 0.011, "loss_vel": 0.004,
               "loss_sc": 0.006, "lambda_vel": 1.25}
    assert format_metrics(metrics) == ("loss 0.0213  out 0.011 vel 0.004 sc 0.006  "
                                       "grad_norm 0.35  lambda_vel 1.25")
    assert format_eta(291.4) == "0:04:51" and format_eta(None) == "?"
    assert format_eta(float("inf")) == "?" and format_eta(3 * 3600 + 7) == "3:00:07"


def test_plain_lines_come_at_each_tenth_and_at_the_end(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "plain_output", lambda: True)
    with ProgressBar("distill", 1500, per_unit=64) as bar:
        for step in range(1, 1501):
            bar.update(step, {"loss": 0.5, "loss_out": 0.25} if step % 50 == 0 else None)
    lines = capsys.readouterr().err.splitlines()
    rows = [parse(line) for line in lines]
    assert [int(r["done"]) for r in rows] == list(range(150, 1501, 150))
    assert rows[0]["metrics"] == "loss 0.5  out 0.25" and rows[-1]["percent"] == "100.0"
    # A resumed run counts from where it was; a disabled bar (not rank 0) says nothing.
    with ProgressBar("distill", 1500, completed=1400, per_unit=64) as bar:
        bar.update(1401)
        bar.update(1500)
    assert [parse(line)["done"] for line in capsys.readouterr().err.splitlines()] == ["1500"]
    with ProgressBar("distill", 10, enabled=False) as bar:
        bar.update(10, {"loss": 1.0})
    assert capsys.readouterr().err == ""


def test_the_teacher_solve_before_a_distillation_counts_every_image(tmp_path: Path) -> None:
    """The cache's teacher solve (minutes on a CPU before step 1) reports its own lines,
    counted in images through the teacher: a short last chunk (5,000 = 4,096 + 904 rows) ends
    the count exactly at the total, so the rate and the ETA are those of the real work."""
    from traflow_cli.flow import evals_on_grid
    from traflow_cli.grids import time_grid

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    small = ["--device", "cpu", "--set", "net.hidden=16"]
    teacher = tmp_path / "teacher"
    subprocess.run([sys.executable, "-m", "traflow_cli", "teacher", "train", "--out",
                    str(teacher), "--steps", "2", *small], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    done = subprocess.run(
        [sys.executable, "-m", "traflow_cli", "distill", "--teacher", str(teacher), "--out",
         str(tmp_path / "student"), "--steps", "1", *small, "--set", "distill.grid_steps=3",
         "--set", "distill.trajectory_cache=5000", "--set", "distill.batch_size=8"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    solves = [line for line in done.stderr.splitlines() if line.startswith("teacher solves")]
    total = 5000 * evals_on_grid("heun", time_grid(3))
    assert solves and solves[-1].startswith(
        f"teacher solves  evaluation {total}/{total}  100.0%  images/s "), done.stderr
    assert solves[-1].split("  ")[4] == "eta 0:00:00"
