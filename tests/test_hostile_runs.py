"""Tampered inputs of a distillation: a swapped teacher, a trajectory cache of the wrong shape,
labels beyond the network's classes. Each is one line naming the file or field, exit 2, and the
student's last good checkpoint kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TOY, invoke
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from traflow_cli import load_student
from traflow_cli.jobs.distill import _tensor_digest

DISTILL = ["--set", "distill.batch_size=64", "--set", "distill.trajectory_cache=64",
           "--set", "distill.checkpoint_every_steps=2", "--set", "distill.log_every_steps=2",
           "--device", "cpu"]


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _teacher(root: Path, name: str, seed: int) -> Path:
    run = root / name
    result = invoke("teacher", "train", "--out", run, "--steps", "20", "--seed", seed, *TINY_TOY)
    assert result.exit_code == 0, result.output
    return run


def test_a_resume_refuses_a_teacher_whose_weights_were_replaced(tmp_path: Path) -> None:
    first, other = _teacher(tmp_path, "teacher", 0), _teacher(tmp_path, "other", 1)
    student = tmp_path / "student"
    assert invoke("distill", "--teacher", first, "--out", student, "--steps", "2",
                  *DISTILL).exit_code == 0
    kept = load_student(student).net.state_dict()
    # Same spec, other weights: the folder now names another teacher.
    shutil.rmtree(first / "checkpoints")
    shutil.copytree(other / "checkpoints", first / "checkpoints")
    result = invoke("distill", "--teacher", first, "--out", student, "--steps", "4", *DISTILL)
    line = _one_error_line(result)
    assert line.startswith("error: distill.teacher:") and str(first) in line
    after = load_student(student).net.state_dict()
    assert all(torch.equal(kept[k], after[k]) for k in kept)  # nothing was trained on it


def test_the_trajectory_cache_names_its_teacher_and_is_solved_again_for_another(
        tmp_path: Path) -> None:
    teacher = _teacher(tmp_path, "teacher", 0)
    student = tmp_path / "student"
    assert invoke("distill", "--teacher", teacher, "--out", student, "--steps", "2",
                  *DISTILL).exit_code == 0
    cache = student / "teacher_trajectories.safetensors"
    with safe_open(cache, framework="pt") as handle:
        key = json.loads(handle.metadata()["key"])
    checkpoints = sorted((teacher / "checkpoints").glob("*.manifest.json"))
    recorded = json.loads(checkpoints[-1].read_text())["files"]
    assert key["teacher_sha256"] in {entry["sha256"] for entry in recorded.values()}


def test_a_cache_with_a_valid_digest_and_the_wrong_row_count_is_solved_again(
        tmp_path: Path) -> None:
    teacher = _teacher(tmp_path, "teacher", 0)
    student = tmp_path / "student"
    assert invoke("distill", "--teacher", teacher, "--out", student, "--steps", "2",
                  *DISTILL).exit_code == 0
    cache = student / "teacher_trajectories.safetensors"
    with safe_open(cache, framework="pt") as handle:
        metadata = handle.metadata()
        arrays = {name: (handle.get_tensor(name)[:, :10] if name == "trajectory" else
                         handle.get_tensor(name)[:10]).contiguous()
                  for name in handle.keys()}  # noqa: SIM118
    # A digest that matches the cut tensors and the original key: only the shapes are wrong.
    save_file(arrays, cache, metadata={**metadata, "sha256": _tensor_digest(arrays)})
    result = invoke("distill", "--teacher", teacher, "--out", student, "--steps", "4", *DISTILL)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "other shapes" in warnings[0], result.stderr
    with safe_open(cache, framework="pt") as handle:
        assert handle.get_slice("noise").get_shape()[0] == 64  # solved again, whole


@pytest.mark.slow
def test_labels_beyond_the_networks_classes_are_refused_before_training(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    for label in range(3):
        (folder / f"c{label}").mkdir(parents=True)
        for i in range(4):
            pixels = np.full((8, 8, 3), 40 * label + i, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"c{label}" / f"{i}.png")
    labels = [[f"c{label}/{i}.png", label] for label in range(3) for i in range(4)]
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    out = tmp_path / "teacher"
    result = invoke("teacher", "train", "--preset", "shapes32", "--out", out, "--steps", "2",
                    "--set", "data.name=folder", "--set", f"data.path={folder}",
                    "--set", "data.use_labels=true", "--set", "data.resolution=8",
                    "--set", "net.image_size=8", "--set", "net.num_classes=2",
                    "--set", "net.ch_mult=[1, 2]", "--set", "net.attn_resolutions=[]",
                    "--set", "teacher.batch_size=4", "--device", "cpu")
    line = _one_error_line(result)
    assert line.startswith("error: data.path:") and "net.num_classes" in line, line
    assert not (out / "spec.json").exists()  # refused before the run was recorded
