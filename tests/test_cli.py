"""CLI contracts: help for every command, exit codes, and what reaches the jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke

COMMANDS = [["teacher", "train"], ["teacher", "import"], ["distill"], ["sample"], ["eval", "toy"],
            ["eval", "agreement"], ["bench"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_explains_its_options(command: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "--set" in text or "--out" in text
    if command != ["teacher", "import"]:
        assert "default" in text


def test_top_level_help_lists_the_five_subcommands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("teacher", "distill", "sample", "eval", "bench"):
        assert name in result.stdout


def test_help_does_not_import_torch() -> None:
    code = ("import sys; from traflow_cli.cli.app import app; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_teacher_train_writes_the_run_folder_contract(toy_teacher: Path) -> None:
    record = json.loads((toy_teacher / "spec.json").read_text())
    assert record["job"] == "teacher" and record["spec"]["teacher"]["duration_steps"] == 300
    assert {"traflow", "torch", "python"} <= set(record["versions"])
    rows = [json.loads(line) for line in (toy_teacher / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 300 and {"loss", "images_per_s", "images_seen"} <= set(rows[-1])
    summary = json.loads((toy_teacher / "summary.json").read_text())
    assert summary["steps"] == 300
    assert (toy_teacher / "checkpoints" / "latest").read_text().strip() == "step-000000300"


def test_a_finished_run_rerun_does_no_more_work(toy_teacher: Path) -> None:
    result = invoke("teacher", "train", "--out", toy_teacher, "--steps", "300", "--device", "cpu",
                    "--set", "net.hidden=64", "--set", "teacher.batch_size=256",
                    "--set", "teacher.log_every_steps=50",
                    "--set", "teacher.checkpoint_every_steps=100", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from_step"] == 300


def test_resume_with_a_different_spec_is_refused_naming_the_fields(toy_teacher: Path) -> None:
    result = invoke("teacher", "train", "--out", toy_teacher, "--set", "teacher.lr=0.5")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith("error: --out:") and "net.hidden" in line and "teacher.lr" in line


def test_sample_and_eval_on_a_teacher_run(toy_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    result = invoke("sample", toy_teacher, "--solver", "heun", "--steps", "10", "-n", "500",
                    "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["nfe"] == 20 and summary["num_samples"] == 500
    result = invoke("eval", "toy", out / "samples.npz", "--teacher", toy_teacher, "-n", "500",
                    "--out", tmp_path / "eval", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert rows[0]["model"].startswith("true samples")
    assert (tmp_path / "eval" / "eval.png").is_file()
