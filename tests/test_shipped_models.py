"""The real models shipped in models/: they load as they are, sample on a CPU in seconds, give
the images they gave when they were shipped, and serve as a teacher to distill from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import invoke

from traflow_cli import load_student, load_teacher

MODELS = Path(__file__).resolve().parents[1] / "models" / "cifar10-cpu"
RECORDED = Path(__file__).resolve().parent / "fixtures" / "shipped_samples.pt"


def _recorded_noise() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2026))


def shipped_samples() -> dict[str, torch.Tensor]:
    """What the shipped models make from the recorded noise (stored as fixtures/shipped_samples.pt
    when models/ changes: python tests/test_shipped_models.py)."""
    noise = _recorded_noise()
    teacher = load_teacher(MODELS / "teacher")
    out = {"teacher_euler8": teacher.sample(noise, steps=8, solver="euler")}
    if (MODELS / "student").is_dir():
        student = load_student(MODELS / "student")
        out |= {"student_nfe1": student.sample(noise, nfe=1),
                "student_nfe2": student.sample(noise, nfe=2)}
    return out


def test_the_shipped_models_make_the_images_they_made_when_shipped() -> None:
    recorded = torch.load(RECORDED, weights_only=True)
    now = shipped_samples()
    assert set(now) == set(recorded)
    for name, images in recorded.items():
        assert now[name].shape == images.shape, name
        assert torch.allclose(now[name], images, atol=1e-4), name
        assert float(now[name].std()) > 0.1, name  # images, not a constant


@pytest.mark.skipif(not (MODELS / "student").is_dir(), reason="no student shipped in models/")
def test_the_shipped_student_samples_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    result = invoke("sample", MODELS / "student", "-n", "16", "--nfe", "1", "--out", out,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(list((out / "images").glob("*.png"))) == 16 and (out / "grid.png").is_file()


@pytest.mark.slow
def test_the_shipped_teacher_is_a_teacher_to_distill_from(tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = invoke("distill", "--teacher", MODELS / "teacher", "--out", out, "--steps", "2",
                    "--set", "distill.batch_size=2", "--set", "distill.trajectory_cache=4",
                    "--set", "distill.checkpoint_every_steps=2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert load_student(out).config == load_teacher(MODELS / "teacher").config


if __name__ == "__main__":
    torch.save(shipped_samples(), RECORDED)
