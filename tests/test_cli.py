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


# ---- what reaches the jobs: the spec resolved from --preset, the flags and --set -------------

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def spec_of(*args: object) -> dict:
    """The resolved spec `--dry-run` prints (exit 0, nothing run)."""
    result = invoke(*args, "--dry-run")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def changed(before: dict, after: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted field: (before, after)} for every field whose value differs."""
    out = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(changed(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out


def recorded_spec(run: Path) -> dict:
    """The spec a job ran with, as it recorded it in the run folder."""
    return json.loads((run / "spec.json").read_text())["spec"]


def test_preset_help_lists_every_preset_in_the_presets_folder() -> None:
    names = sorted(p.stem for p in PRESETS.glob("*.toml"))
    assert len(names) >= 9 and "cifar10-cpu" in names
    result = invoke("teacher", "train", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.replace("│", " ").split())
    assert f"Preset name ({', '.join(names)}) or a .toml file." in text


def test_teacher_train_receives_the_preset_with_the_flags_and_sets_applied(tmp_path: Path) -> None:
    args = ["--set", "teacher.lr=3e-4", "--seed", "7", "--steps", "2", "--device", "cpu",
            "--set", "net.hidden=32", "--set", "teacher.batch_size=64"]
    asked = spec_of("teacher", "train", *args)
    # Against toy2d (the default preset) exactly the fields asked for differ, each as asked.
    assert changed(spec_of("teacher", "train"), asked) == {
        "net.hidden": (256, 32), "runtime.device": ("auto", "cpu"), "seed": (0, 7),
        "teacher.batch_size": (1024, 64), "teacher.duration_steps": (3000, 2),
        "teacher.lr": (2e-3, 3e-4)}
    assert spec_of("teacher", "train", "--preset", "toy2d", *args) == asked
    # The job runs with what --dry-run printed.
    run = tmp_path / "teacher"
    result = invoke("teacher", "train", *args, "--out", run, "--json")
    assert result.exit_code == 0, result.output
    assert recorded_spec(run) == asked
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["images_seen"] == 2 * 64


def test_a_preset_file_is_the_base_and_set_wins_over_it(tmp_path: Path) -> None:
    preset = tmp_path / "mine.toml"
    preset.write_text('seed = 11\n[data]\nname = "ring8"\n[net]\nkind = "mlp"\ndim = 2\n'
                      'hidden = 48\n[teacher]\nlr = 5e-4\nduration_steps = 77\n')
    spec = spec_of("teacher", "train", "--preset", preset, "--set", "teacher.lr=1e-4")
    assert spec["preset"] == "mine" and spec["seed"] == 11
    assert spec["net"]["hidden"] == 48 and spec["teacher"]["duration_steps"] == 77
    assert spec["teacher"]["lr"] == 1e-4  # --set, not the file's 5e-4
    assert spec_of("teacher", "train", "--preset", "shapes32")["data"]["name"] == "shapes32"


def test_distill_receives_the_teachers_network_and_the_flags(toy_teacher: Path,
                                                              tmp_path: Path) -> None:
    args = ["--teacher", toy_teacher, "--set", "distill.lr=2e-4", "--seed", "3", "--steps", "1",
            "--set", "distill.batch_size=16", "--set", "distill.trajectory_cache=0"]
    plain, asked = spec_of("distill", "--teacher", toy_teacher), spec_of("distill", *args)
    assert changed(plain, asked) == {
        "distill.batch_size": (1024, 16), "distill.duration_steps": (1000, 1),
        "distill.lr": (5e-4, 2e-4), "distill.trajectory_cache": (32768, 0), "seed": (0, 3)}
    # Without --preset the base is the teacher run's own spec: its network, its device.
    teacher = recorded_spec(toy_teacher)
    assert asked["net"] == teacher["net"] and asked["net"]["hidden"] == 64
    assert asked["runtime"]["device"] == teacher["runtime"]["device"] == "cpu"
    assert asked["distill"]["teacher"] == str(toy_teacher)
    run = tmp_path / "student"
    result = invoke("distill", *args, "--out", run, "--json")
    assert result.exit_code == 0, result.output
    assert recorded_spec(run) == asked


def test_distill_method_flag_chooses_the_objective_and_its_section(toy_teacher: Path) -> None:
    plain = spec_of("distill", "--teacher", toy_teacher)
    asked = spec_of("distill", "--teacher", toy_teacher, "--method", "eulerian")
    traflow = plain["distill"]["traflow"]
    assert traflow["w_vel"] == 1.0 and traflow["lambda_vel"] == "adaptive"
    # TraFlow's section (the default method's) gives way to the chosen method's own.
    assert changed(plain, asked) == {"distill.method": ("traflow", "eulerian"),
                                     "distill.traflow": (traflow, None),
                                     "distill.eulerian": (None, {"diagonal": 0.75,
                                                                 "adaptive_p": 1.0,
                                                                 "adaptive_c": 1e-3,
                                                                 "tangent_warmup": 0})}


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, start, words", [
    (["--set", "teacher.lr=-1"], "error: teacher.lr:", ["greater than 0", "-1"]),
    (["--set", "teacher.lr=abc"], "error: teacher.lr:", ["valid number", "'abc'"]),
    (["--set", "teacher.lrr=1"], "error: teacher.lrr:", ["unknown field"]),
    (["--set", "net.hidden"], "error: --set", ["net.hidden", "section.key=value"]),
    (["--preset", "nope"], "error: --preset:", ["'nope'", "cifar10-cpu", ".toml"]),
], ids=["out-of-range", "not-a-number", "unknown-field", "no-value", "unknown-preset"])
def test_a_bad_value_exits_2_with_one_line_naming_the_field(args: list[str], start: str,
                                                            words: list[str],
                                                            tmp_path: Path) -> None:
    for dry in ([], ["--dry-run"]):
        line = one_error_line(invoke("teacher", "train", *args, *dry, "--out", tmp_path / "run"))
        assert line.startswith(start) and all(w in line for w in words), line
    assert not (tmp_path / "run").exists()


def test_distill_bad_value_names_the_field(toy_teacher: Path, tmp_path: Path) -> None:
    line = one_error_line(invoke("distill", "--teacher", toy_teacher, "--set", "distill.lr=0",
                                 "--out", tmp_path / "s"))
    assert line.startswith("error: distill.lr:") and "greater than 0" in line
    assert not (tmp_path / "s").exists()
