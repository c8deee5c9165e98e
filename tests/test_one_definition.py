"""Concepts that used to be defined twice now have one definition that every caller shares:
the rule for sampling times (spec and sampler), the binding of class labels to a teacher
(fixed-step and per-sample solvers), and the choice of device (training and FID)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import invoke
from pydantic import ValidationError
from torch import Tensor, nn

from traflow_cli.engine.runtime import RuntimeSetupError, resolve_device
from traflow_cli.flow import solve_rk45, solve_rk45_per_sample
from traflow_cli.sampling import student_times, teacher_row_velocity, teacher_velocity
from traflow_cli.specs import SampleSpec

TIMES = [
    (2, [0.0, 0.5, 1.0], None),
    (3, [0.0, 0.2, 0.7, 1.0], None),
    (2, [0.0, 1.0], "times has 2 entries; nfe=2 needs 3 (from 0 to 1)"),
    (1, [0.0, 0.5, 1.0], "times has 3 entries; nfe=1 needs 2 (from 0 to 1)"),
    (2, [0.0, 0.7, 0.3], "times must increase strictly from 0 to 1"),
    (2, [0.1, 0.5, 1.0], "times must increase strictly from 0 to 1"),
    (2, [0.0, 0.5, 0.5], "times must increase strictly from 0 to 1"),
]


@pytest.mark.parametrize(("nfe", "times", "error"), TIMES)
def test_spec_and_sampler_judge_sampling_times_alike(nfe: int, times: list[float],
                                                     error: str | None) -> None:
    if error is None:
        assert SampleSpec(nfe=nfe, times=times).times == times
        assert student_times(nfe, times).tolist() == pytest.approx(times)
        return
    with pytest.raises(ValidationError, match=re.escape(error)):
        SampleSpec(nfe=nfe, times=times)
    with pytest.raises(ValueError, match=re.escape(error)):
        student_times(nfe, times)


def test_sampler_checks_times_at_the_precision_it_jumps_in() -> None:
    times = [0.0, 0.5, 0.5 + 1e-12, 1.0]  # distinct in float64, one point in float32
    with pytest.raises(ValueError, match="increase strictly"):
        student_times(3, times)


class RateByClass(nn.Module):
    """dx/dt = r[class] (1 + 3t) x, so x(1) = x(0) exp(2.5 r[class]); a class-conditional field."""

    def __init__(self) -> None:
        super().__init__()
        self.rates = torch.tensor([-2.0, -1.0, 0.5, 3.0])

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        assert class_labels is not None and len(class_labels) == len(x)
        return self.rates[class_labels].view(-1, 1) * x * (1 + 3 * t.view(-1, 1))


def test_each_row_of_an_adaptive_solve_gets_its_own_label() -> None:
    net = RateByClass()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 0, 2, 1, 3, 0])
    out, nfe = solve_rk45_per_sample(teacher_row_velocity(net, labels), x, rtol=1e-8, atol=1e-8)
    exact = x * torch.exp(2.5 * net.rates[labels]).view(-1, 1)
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    for i in range(6):  # the same label bound the fixed way gives the same solve, sample alone
        alone, alone_nfe = solve_rk45(teacher_velocity(net, labels[i:i + 1]), x[i:i + 1],
                                      rtol=1e-8, atol=1e-8)
        assert torch.equal(alone, out[i:i + 1]) and alone_nfe == int(nfe[i])
    assert teacher_velocity(net, None) is net  # unconditional: the network itself


def test_device_choices_resolve_in_one_place(tmp_path: Path) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        return
    with pytest.raises(RuntimeSetupError) as info:
        resolve_device("cuda")
    message = str(info.value)
    assert message.startswith("runtime.device: 'cuda'") and "\n" not in message
    # FID refuses it with the same line as training, before reading any image.
    result = invoke("eval", "fid", tmp_path, "--ref", tmp_path, "--device", "cuda", "--offline")
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}", result.stderr
    result = invoke("teacher", "train", "--device", "cuda", "--out", tmp_path / "run")
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}", result.stderr
