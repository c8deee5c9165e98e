"""Concepts that used to be defined twice now have one definition that every caller shares:
the rule for sampling times (spec and sampler), the binding of class labels to a teacher
(fixed-step and per-sample solvers), the choice of device (training and FID), whether data is
toy or images, whether a network is an EDM teacher, and where presets, run-folder specs and
FIDError come from."""

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
from traflow_cli.grids import student_times
from traflow_cli.sampling import teacher_row_velocity, teacher_velocity
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


# ---- one home per rule: toy or image data, EDM or rectified flow, presets or run folders ----


def test_toy_or_image_data_is_decided_in_one_place() -> None:
    from traflow_cli.specs import DataSpec, is_toy_data

    assert is_toy_data(DataSpec(name="checkerboard")) and not is_toy_data(DataSpec(name="cifar10"))
    # Raw sections, as a preset or --set gives them before validation: no name is the default's.
    assert is_toy_data({}) and is_toy_data(None) and is_toy_data({"name": "ring8"})
    assert not is_toy_data({"name": "shapes32"}) and not is_toy_data({"name": "folder"})
    # Every other module asks is_toy_data (or DataSpec.is_toy); none lists the toy datasets.
    package = Path(__file__).resolve().parents[1] / "traflow_cli"
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                   if "TOY_DATASETS" in p.read_text())
    assert users == ["specs.py"], users


def test_every_network_says_whether_it_is_an_edm_teacher() -> None:
    from traflow_cli.models import Teacher
    from traflow_cli.nets import build_net

    configs = [{"kind": "mlp", "hidden": 8, "depth": 2, "time_dim": 8},
               {"kind": "ncsnpp", "image_size": 16, "nf": 8, "ch_mult": [1], "num_res_blocks": 1,
                "attn_resolutions": []}]
    for config in configs:
        net = build_net(config)
        assert "sigma_range" in vars(type(net)) and net.sigma_range is None
        assert Teacher(net, config).sigma_range is None
    with torch.device("meta"):
        edm = build_net({"kind": "edm", "image_size": 16, "precond": {"kind": "edm"},
                         "model": {"type": "SongUNet", "model_channels": 16,
                                   "channel_mult": [1, 2], "num_blocks": 1}})
    assert Teacher(edm, {}).sigma_range == (0.002, 80.0)
    # A network that does not say is an error, not silently a rectified flow.
    with pytest.raises(AttributeError, match="sigma_range"):
        _ = Teacher(nn.Linear(2, 2), {}).sigma_range


def test_presets_and_run_folders_load_through_their_own_functions(toy_teacher: Path) -> None:
    from traflow_cli.presets import load_preset, load_run_spec
    from traflow_cli.specs import SpecError

    assert load_preset("toy2d")["preset"] == "toy2d"
    assert load_run_spec(toy_teacher, "RUN")["preset"] == "toy2d"
    with pytest.raises(SpecError, match="is a folder, not a preset"):
        load_preset(str(toy_teacher))
    result = invoke("teacher", "train", "--preset", toy_teacher, "--dry-run")
    assert result.exit_code == 2 and result.stderr.startswith("error: --preset: "), result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_preset_name_wins_over_a_folder_of_that_name(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A run folder called toy2d in the working directory does not hide the toy2d preset."""
    from traflow_cli.presets import load_preset

    (tmp_path / "toy2d").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_preset("toy2d")["preset"] == "toy2d"


def test_write_grid_is_not_a_time_grid_and_old_records_still_load(toy_teacher: Path,
                                                                   tmp_path: Path) -> None:
    import json
    import shutil

    assert not SampleSpec(write_grid=False).write_grid and SampleSpec().write_grid
    assert "grid" not in SampleSpec.model_fields
    # A run folder recorded before the rename says `grid`; its spec is still the base of a run.
    old = tmp_path / "teacher"
    shutil.copytree(toy_teacher, old)
    record = json.loads((old / "spec.json").read_text())
    record["spec"]["sample"].pop("write_grid")
    record["spec"]["sample"]["grid"] = False
    (old / "spec.json").write_text(json.dumps(record))
    result = invoke("sample", old, "--dry-run")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sample"]["write_grid"] is False


def test_fid_error_lives_with_the_other_errors() -> None:
    from traflow_cli import errors
    from traflow_cli.metrics import fid, frechet

    assert errors.FIDError.__module__ == "traflow_cli.errors"
    assert fid.FIDError is frechet.FIDError is errors.FIDError
    assert issubclass(errors.FIDError, errors.UserError)
