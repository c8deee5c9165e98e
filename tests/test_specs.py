"""Run specs: presets validate; bad values fail before any work with one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import invoke

from traflow_cli.presets import apply_override, available_presets, parse_value, resolve_spec
from traflow_cli.specs import SpecError, resume_conflicts


@pytest.mark.parametrize("name", available_presets())
def test_every_shipped_preset_validates(name: str) -> None:
    spec = resolve_spec(name)
    assert spec.preset == name


def test_the_default_preset_is_the_toy_ring() -> None:
    assert "toy2d" in available_presets()
    spec = resolve_spec()
    assert spec.data.name == "ring8" and spec.net.kind == "mlp"


def test_overrides_parse_toml_values_and_fall_back_to_strings() -> None:
    assert parse_value("3") == 3 and parse_value("2e-4") == 2e-4
    assert parse_value("[1, 2]") == [1, 2] and parse_value("true") is True
    assert parse_value("runs/teacher") == "runs/teacher"
    raw: dict = {}
    apply_override(raw, "distill.lr=0.5")
    assert raw == {"distill": {"lr": 0.5}}
    # TraFlow's fields by their older, flat names land in TraFlow's own section.
    apply_override(raw, "distill.w_vel=0")
    assert raw == {"distill": {"lr": 0.5, "traflow": {"w_vel": 0}}}


BAD_INPUTS = [
    (["--set", "distill.bogus=1"], "distill.bogus"),
    (["--set", "teacher.lr=fast"], "teacher.lr"),
    (["--set", "teacher.duration_steps=-5"], "teacher.duration_steps"),
    (["--set", "sample.nfe=0"], "sample.nfe"),
    (["--set", "distill.teacher=/no/such/run"], "distill.teacher"),
    (["--set", "net.kind=resnet"], "net"),
    (["--set", "distill.w_out=0", "--set", "distill.w_vel=0", "--set", "distill.w_sc=0"], "distill"),
    (["--set", "sample.nfe=2", "--set", "sample.times=[0, 1]"], "sample"),
    (["--set", "nonsense"], "--set"),
    (["--preset", "no-such-preset"], "--preset"),
    (["--device", "gpu"], "runtime.device"),
]


@pytest.mark.parametrize(("args", "field"), BAD_INPUTS, ids=[b[1] + str(i) for i, b in
                                                              enumerate(BAD_INPUTS)])
def test_bad_input_exits_nonzero_with_one_line_naming_the_field(args: list[str], field: str,
                                                               tmp_path: Path) -> None:
    result = invoke("distill", "--out", tmp_path / "run", *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {field}"), lines[0]
    assert not (tmp_path / "run").exists()  # nothing was started


def test_missing_teacher_names_the_flag_to_pass(tmp_path: Path) -> None:
    result = invoke("distill", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: distill.teacher: required; pass --teacher RUN_DIR "
                                     "(a teacher run folder)")


def test_resume_ignores_durations_but_not_hyperparameters() -> None:
    a = resolve_spec().model_dump(mode="json")
    b = resolve_spec(overrides=["distill.duration_steps=5", "distill.log_every_steps=1"]
                     ).model_dump(mode="json")
    c = resolve_spec(overrides=["distill.lr=1e-2", "seed=3"]).model_dump(mode="json")
    sections = ("seed", "data", "net", "distill")
    assert resume_conflicts(a, b, sections) == []
    assert resume_conflicts(a, c, sections) == ["seed", "distill.lr"]


def test_dry_run_prints_the_resolved_spec_with_flags_and_overrides(tmp_path: Path) -> None:
    result = invoke("teacher", "train", "--dry-run", "--seed", "7", "--device", "cpu",
                    "--steps", "12", "--set", "teacher.lr=0.01", "--out", tmp_path / "x")
    assert result.exit_code == 0, result.output
    spec = json.loads(result.stdout)
    assert spec["seed"] == 7 and spec["runtime"]["device"] == "cpu"
    assert spec["teacher"]["duration_steps"] == 12 and spec["teacher"]["lr"] == 0.01
    assert not (tmp_path / "x").exists()


def test_spec_errors_are_spec_errors_in_the_python_api() -> None:
    with pytest.raises(SpecError, match=r"^sample\.nfe: "):
        resolve_spec(overrides=["sample.nfe=0"])
