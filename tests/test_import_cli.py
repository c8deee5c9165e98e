"""`traflow teacher import rectified-flow`: an official checkpoint becomes a teacher run folder
that computes the official network's velocity, distills and samples on the CPU; bad files end
with exit code 2 and one `error:` line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_FIXTURES, invoke

from traflow_cli import load_student, load_teacher

OFFICIAL = OFFICIAL_FIXTURES
# Tiny distillation of a cifar10-preset student: the preset's recipe, a few small steps.
TINY_DISTILL = ["--set", "distill.grid_steps=4", "--set", "distill.batch_size=4",
                "--set", "distill.trajectory_cache=0", "--set", "distill.log_every_steps=1",
                "--steps", "2", "--device", "cpu"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def import_run(ckpt: Path, out: Path, *extra: str):
    return invoke("teacher", "import", "rectified-flow", ckpt, "--out", out, "--json", *extra)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official 32x32 fixture imported with the cifar10 preset (the command's default)."""
    ckpt, _, _ = OFFICIAL["official-nf16"]
    out = tmp_path_factory.mktemp("import") / "teacher"
    result = import_run(ckpt, out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_imported_teacher_computes_the_official_velocity(name: str, tmp_path: Path) -> None:
    ckpt, io_path, size = OFFICIAL[name]
    result = import_run(ckpt, tmp_path / "teacher", "--image-size", str(size))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["job"] == "teacher-import" and summary["image_size"] == size
    io = torch.load(io_path, map_location="cpu", weights_only=True)
    teacher = load_teacher(tmp_path / "teacher")
    with torch.no_grad():
        v = teacher.velocity(io["x"], io["t"])  # t in [0, 1]; the net applies the 999 scale
    assert rel_err(v, io["v"]) < 1e-5
    spec = json.loads((tmp_path / "teacher" / "spec.json").read_text())
    assert spec["job"] == "teacher" and spec["spec"]["net"]["nf"] == io["config"]["nf"]
    assert spec["spec"]["data"]["resolution"] == size


def test_raw_weights_import_the_training_weights(tmp_path: Path) -> None:
    ckpt, io_path, size = OFFICIAL["official-nf12"]
    result = import_run(ckpt, tmp_path / "raw", "--image-size", str(size), "--raw-weights")
    assert result.exit_code == 0, result.output
    io = torch.load(io_path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        v = load_teacher(tmp_path / "raw").velocity(io["x"], io["t"])
    assert rel_err(v, io["v_raw"]) < 1e-5


def test_imported_teacher_distills_and_samples_on_cpu(imported: Path, tmp_path: Path) -> None:
    student = tmp_path / "student"
    result = invoke("distill", "--teacher", imported, "--preset", "cifar10", "--out", student,
                    "--json", *TINY_DISTILL)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2
    assert all(torch.isfinite(torch.tensor(v)) for k, v in summary["final_metrics"].items()
               if k.startswith("loss"))
    spec = json.loads((student / "spec.json").read_text())["spec"]
    assert spec["net"]["nf"] == 16 and spec["distill"]["lr"] == 4e-4  # teacher's net, preset's recipe
    assert load_student(student).config == load_teacher(imported).config

    result = invoke("sample", student, "-n", "6", "--batch-size", "4", "--nfe", "2", "--json")
    assert result.exit_code == 0, result.output
    out = Path(json.loads(result.stdout)["out"])
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [
        f"{i:06d}.png" for i in range(6)]
    assert (out / "grid.png").is_file()


def test_reimport_replaces_an_import_but_never_another_run(imported: Path,
                                                           tmp_path: Path) -> None:
    copy = tmp_path / "again"
    shutil.copytree(imported, copy)
    ckpt, _, size = OFFICIAL["official-nf12"]
    result = import_run(ckpt, copy, "--image-size", str(size))
    assert result.exit_code == 0, result.output  # an earlier import: replaced
    assert load_teacher(copy).config["nf"] == 12

    student = tmp_path / "student"
    assert invoke("distill", "--teacher", imported, "--out", student, "--preset", "cifar10",
                  *TINY_DISTILL).exit_code == 0
    before = (student / "spec.json").read_text()
    result = import_run(ckpt, student)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: --out:"), result.stderr
    assert (student / "spec.json").read_text() == before


def _bad_files(folder: Path) -> dict[str, Path]:
    """Files that are not official Rectified Flow checkpoints, each a different way."""
    good, io_path, _ = OFFICIAL["official-nf16"]
    text = folder / "notes.pth"
    text.write_text("not a checkpoint\n")
    truncated = folder / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:50_000])
    module = folder / "module.pth"
    torch.save(torch.nn.Linear(2, 2), module)
    no_model = folder / "no_model.pth"
    torch.save({"ema": {}, "step": 3}, no_model)
    wrong_net = folder / "wrong_net.pth"
    torch.save({"model": {"module.fc.weight": torch.zeros(2, 2)}}, wrong_net)
    return {"missing": folder / "missing.pth", "folder": folder, "text": text,
            "truncated": truncated, "pickled module": module, "io tensors": io_path,
            "no model entry": no_model, "not an NCSNpp": wrong_net}


def test_wrong_files_exit_2_with_one_error_line(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, path in _bad_files(inputs).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        result = import_run(path, out)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
        assert "Traceback" not in result.output, name
        assert not (out / "spec.json").exists(), name  # nothing half-written


@pytest.mark.parametrize("args", [
    ["teacher", "import", "stylegan", "{ckpt}"],                       # unknown family
    ["teacher", "import", "edm", "{ckpt}"],                            # not an EDM pickle
    ["teacher", "import", "rectified-flow", "{ckpt}", "--preset", "toy2d"],
    ["teacher", "import", "rectified-flow", "{ckpt}", "--preset", "nope"],
    ["teacher", "import", "rectified-flow", "{ckpt}", "--set", "net.nf=oops"],
])
def test_usage_errors_exit_2_with_one_error_line(args: list[str], tmp_path: Path) -> None:
    ckpt = OFFICIAL["official-nf16"][0]
    result = invoke(*[a.format(ckpt=ckpt) for a in args], "--out", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not (tmp_path / "out").exists()
