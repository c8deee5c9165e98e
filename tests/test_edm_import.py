"""`traflow teacher import edm`: NVlabs/edm snapshots become teacher runs that compute EDM's
denoiser as a velocity and reproduce EDM's sampler; nothing in a pickle ever runs, and every bad
file ends with exit code 2 and one `error:` line."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EDM_FIXTURES, invoke
from conftest import FIXTURES as FIXTURE_DIR
from safetensors.torch import load_file

from traflow_cli import load_student, load_teacher
from traflow_cli.grids import teacher_grid
from traflow_cli.interop import CheckpointFormatError, UnsafePickleError, read_edm_snapshot
from traflow_cli.jobs.writers import to_uint8
from traflow_cli.sampling import noise_for_indices

EDM = EDM_FIXTURES
# name: (snapshot, io file), all made with EDM's own code (tests/fixtures/README.md): the
# EDMPrecond ones in fixtures/edm/, and two for preconditionings and settings those do not use.
FIXTURES = {
    "ddpmpp": (EDM / "edm_ddpmpp_small.pkl", EDM / "edm_ddpmpp_small_io.pt"),
    "adm-cond": (EDM / "edm_adm_cond_small.pkl", EDM / "edm_adm_cond_small_io.pt"),
    "ncsnpp-ve-cond": (FIXTURE_DIR / "edm_ncsnpp_ve_cond.pkl",
                       FIXTURE_DIR / "edm_ncsnpp_ve_cond_io.pt"),
    "ddpmpp-vp-skip": (FIXTURE_DIR / "edm_ddpmpp_vp_skip.pkl",
                       FIXTURE_DIR / "edm_ddpmpp_vp_skip_io.pt"),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def import_edm(snapshot: Path, out: Path, *extra: str):
    return invoke("teacher", "import", "edm", snapshot, "--out", out, "--json", *extra)


def edm_velocity(io: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, v) from EDM's (x, sigma, denoised): t = 1/(1+sigma), x_t = t x,
    v = (D - x_t) / (1 - t), in float64."""
    t = 1 / (1 + io["sigma"].double())
    tb = t[:, None, None, None]
    x_t = tb * io["x"].double()
    return x_t, t, (io["denoised"].double() - x_t) / (1 - tb)


def rewrite(data: bytes, renames: dict[str, str]) -> bytes:
    """The pickle with every string opcode equal to a key replaced (FRAME opcodes dropped, as
    they are optional and their lengths would no longer hold)."""
    out = bytearray()
    ops = list(pickletools.genops(data))
    for k, (op, arg, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else len(data)
        if op.name == "FRAME":
            continue
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE") and arg in renames:
            new = renames[arg].encode()
            out += (bytes([0x8C, len(new)]) if len(new) < 256 else
                    b"X" + len(new).to_bytes(4, "little")) + new
        else:
            out += data[pos:end]
    return bytes(out)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every fixture imported through the CLI, with the preset the command picks."""
    folder = tmp_path_factory.mktemp("edm")
    runs = {}
    for name, (snapshot, _) in FIXTURES.items():
        result = import_edm(snapshot, folder / name)
        assert result.exit_code == 0, result.output
        runs[name] = folder / name
    return runs


@pytest.mark.parametrize("name", list(FIXTURES))
def test_imported_velocity_is_edms_denoiser(name: str, imported: dict[str, Path]) -> None:
    io = torch.load(FIXTURES[name][1], weights_only=True)
    x_t, t, v_ref = edm_velocity(io)
    teacher = load_teacher(imported[name])
    with torch.no_grad():
        v = teacher.velocity(x_t.float(), t.float(), class_labels=io.get("class_labels"))
    assert rel_err(v, v_ref) < 1e-4


@pytest.mark.parametrize("name", list(FIXTURES))
def test_eighteen_heun_steps_on_the_karras_grid_are_edms_sampler(
        name: str, imported: dict[str, Path]) -> None:
    io = torch.load(FIXTURES[name][1], weights_only=True)
    teacher = load_teacher(imported[name])
    labels = io.get("sampler_class_labels")
    out = teacher.sample(io["sampler_latents"], steps=18, solver="heun", grid="karras",
                         class_labels=labels)
    assert rel_err(out, io["sampler_out"]) < 1e-4
    assert teacher.native_grid == "karras"  # and so the default grid
    assert torch.equal(teacher.sample(io["sampler_latents"], steps=18, class_labels=labels), out)
    assert teacher.sigma_range == pytest.approx((io["sigma_min"], io["sigma_max"]))


def test_import_writes_a_teacher_run_with_a_fitting_preset(imported: dict[str, Path]) -> None:
    summary = json.loads((imported["adm-cond"] / "summary.json").read_text())
    assert summary["precond"] == "EDMPrecond" and summary["model"] == "DhariwalUNet"
    assert summary["native_grid"] == "karras" and summary["num_classes"] == 7
    record = json.loads((imported["adm-cond"] / "spec.json").read_text())
    spec = record["spec"]
    assert record["job"] == "teacher" and spec["preset"] == "cifar10-edm"  # 16x16: not a 64 preset
    assert spec["net"]["kind"] == "edm" and spec["net"]["model"]["model_channels"] == 32
    assert spec["data"]["resolution"] == 16 and spec["data"]["use_labels"] is True
    vp = json.loads((imported["ddpmpp-vp-skip"] / "spec.json").read_text())["spec"]["net"]
    assert vp["precond"] == {"kind": "vp", "beta_d": 16.0, "beta_min": 0.2, "M": 1000,
                             "epsilon_t": 2e-4}
    assert vp["model"]["encoder_type"] == vp["model"]["decoder_type"] == "skip"


def test_reimport_replaces_an_earlier_import(imported: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    assert import_edm(FIXTURES["ddpmpp"][0], out).exit_code == 0
    result = import_edm(FIXTURES["adm-cond"][0], out)
    assert result.exit_code == 0, result.output
    assert load_teacher(out).config["model"]["type"] == "DhariwalUNet"


@pytest.mark.parametrize("precond", ["VEPrecond", "VPPrecond"])
def test_other_preconditionings_give_the_velocity_of_their_formulas(precond: str,
                                                                    tmp_path: Path) -> None:
    """The fixtures/edm DDPM++ weights re-wrapped in VEPrecond / VPPrecond (their defaults)."""
    snapshot = tmp_path / f"{precond}.pkl"
    snapshot.write_bytes(rewrite(FIXTURES["ddpmpp"][0].read_bytes(), {"EDMPrecond": precond}))
    result = import_edm(snapshot, tmp_path / "teacher")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    teacher = load_teacher(tmp_path / "teacher")
    io = torch.load(FIXTURES["ddpmpp"][1], weights_only=True)
    sigma_edm = io["sigma"].double()[1:5]  # 0.05 .. 20: inside both ranges once mapped
    x_edm = io["x"].double()[1:5]
    if precond == "VEPrecond":
        # VE: D = y + sigma F(y; log(sigma / 2)). EDM's fixture call evaluated F at input
        # c_in x, label log(sigma) / 4, which VE reaches at y = c_in x, sigma = 2 sigma^(1/4).
        assert summary["sigma_min"] == 0.02 and summary["sigma_max"] == 80.0
        c_in = 1 / (0.25 + sigma_edm**2).sqrt()
        c_skip, c_out = 0.25 / (sigma_edm**2 + 0.25), sigma_edm * 0.5 / (sigma_edm**2 + 0.25).sqrt()
        f = (io["denoised"].double()[1:5] - c_skip[:, None, None, None] * x_edm) / c_out[
            :, None, None, None]
        sigma, y = 2 * sigma_edm**0.25, c_in[:, None, None, None] * x_edm
        denoised = y + sigma[:, None, None, None] * f
    else:
        # VP: D = y - sigma F(y / sqrt(sigma^2 + 1); 999 * t(sigma)), with EDM's default
        # beta_d = 19.9, beta_min = 0.1, evaluated with the imported U-Net itself.
        assert summary["sigma_min"] == 0.002 and summary["sigma_max"] == 80.0
        sigma, y = sigma_edm, x_edm
        t_vp = ((0.01 + 2 * 19.9 * torch.log1p(sigma**2)).sqrt() - 0.1) / 19.9
        with torch.no_grad():
            f = teacher.net.model((y / (sigma**2 + 1).sqrt()[:, None, None, None]).float(),
                                  (999 * t_vp).float()).double()
        denoised = y - sigma[:, None, None, None] * f
    t = 1 / (1 + sigma)
    x_t = t[:, None, None, None] * y
    with torch.no_grad():
        v = teacher.velocity(x_t.float(), t.float())
    assert rel_err(v, (denoised - x_t) / (1 - t[:, None, None, None])) < 1e-4


def test_a_pickle_that_runs_a_command_is_refused_and_the_command_never_runs(
        tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    snapshot = tmp_path / "evil.pkl"
    snapshot.write_bytes(pickle.dumps({"ema": Payload()}))
    result = import_edm(snapshot, tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert f"{os.system.__module__}.system" in lines[0]  # names the global it refused
    assert not marker.exists() and not (tmp_path / "out").exists()
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        bad = tmp_path / "eval.pkl"
        bad.write_bytes(pickle.dumps({"ema": {"x": eval}}))
        read_edm_snapshot(bad)


def _bad_snapshots(folder: Path) -> dict[str, tuple[Path, str]]:
    """(file, a word its one-line error must contain), one per way a snapshot can be wrong."""
    good = FIXTURES["ddpmpp"][0].read_bytes()
    files = {
        "truncated": good[: len(good) // 2],
        "no ema": pickle.dumps({"loss_fn": None, "augment_pipe": None}),
        "unknown network class": rewrite(good, {"SongUNet": "MysteryUNet"}),
        "unknown precond": rewrite(good, {"EDMPrecond": "FancyPrecond"}),
        "iDDPM": rewrite(good, {"EDMPrecond": "iDDPMPrecond"}),
        "unknown setting": rewrite(good, {"encoder_type": "encoder_flavour"}),
        "not a pickle": b"just text\n",
    }
    words = {"truncated": "truncated", "no ema": "'ema'", "unknown network class": "MysteryUNet",
             "unknown precond": "FancyPrecond", "iDDPM": "iDDPMPrecond",
             "unknown setting": "encoder_flavour", "not a pickle": "not a network pickle"}
    out = {}
    for name, data in files.items():
        path = folder / f"{name.replace(' ', '_')}.pkl"
        path.write_bytes(data)
        out[name] = (path, words[name])
    zipped = folder / "weights.pt"
    torch.save({"w": torch.zeros(2)}, zipped)
    out["torch.save zip"] = (zipped, "rectified-flow")
    out["missing"] = (folder / "missing.pkl", "no such file")
    return out


def test_bad_snapshots_exit_2_with_one_line_naming_the_problem(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, (path, word) in _bad_snapshots(inputs).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        result = import_edm(path, out)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
        assert word in lines[0], (name, lines[0])
        assert "Traceback" not in result.output, name
        assert not out.exists(), name  # nothing half-written
    with pytest.raises(CheckpointFormatError):
        read_edm_snapshot(inputs / "truncated.pkl")


@pytest.mark.parametrize("args", [
    ["--image-size", "32"],
    ["--raw-weights"],
    ["--preset", "toy2d"],
    ["--set", "net.model.dropout=7"],
    ["--set", "net.model.channel_mult=[1, 2, 2]"],  # settings that do not hold the file's weights
])
def test_usage_errors_exit_2_with_one_error_line(args: list[str], tmp_path: Path) -> None:
    result = import_edm(FIXTURES["ddpmpp"][0], tmp_path / "out", *args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not (tmp_path / "out").exists()


def test_an_edm_teacher_distills_on_its_karras_grid_and_its_student_samples(
        imported: dict[str, Path], tmp_path: Path) -> None:
    """The teacher's own grid and sampler reach distillation: the cached trajectories end where
    EDM's Heun sampler ends from the same noise, the student jumps on that grid from t_min, and
    class labels are drawn per sample index (or fixed by --class-label)."""
    teacher_dir = imported["adm-cond"]
    student = tmp_path / "student"
    result = invoke("distill", "--teacher", teacher_dir, "--out", student,
                    "--set", "distill.grid_steps=4", "--set", "distill.batch_size=4",
                    "--set", "distill.trajectory_cache=4", "--set", "distill.log_every_steps=1",
                    "--steps", "2", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["final_metrics"]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith("loss"))

    teacher = load_teacher(teacher_dir)
    cache = load_file(student / "teacher_trajectories.safetensors")
    ends = teacher.sample(cache["noise"], steps=4, solver="heun", grid="karras",
                          class_labels=cache["labels"])
    assert rel_err(cache["trajectory"][-1], ends) < 1e-5
    t_min = 1 / (1 + teacher.sigma_range[1])
    assert cache["trajectory"][0].double().div(cache["noise"].double()).sub(1 - t_min).abs().max() \
        < 1e-5  # EDM's sigma_max * latents, in our scale

    loaded = load_student(student)
    assert loaded.time_grid == "karras" and loaded.grid_steps == 4
    karras = teacher_grid("karras", 4, teacher.sigma_range)
    assert torch.equal(loaded.times(2), karras[[0, 2, 4]])  # jumps between points it was taught
    assert loaded.times(1)[0].item() == pytest.approx(t_min)

    out = tmp_path / "samples"
    result = invoke("sample", student, "-n", "9", "--batch-size", "4", "--nfe", "2",
                    "--format", "both", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert len(list((out / "images").glob("*.png"))) == 9
    assert np.load(out / "samples.npz")["labels"].tolist() == [i % 7 for i in range(9)]
    fixed = tmp_path / "class3"
    result = invoke("sample", student, "-n", "4", "--nfe", "1", "--class-label", "3",
                    "--format", "both", "--out", fixed)
    assert result.exit_code == 0, result.output
    assert np.load(fixed / "samples.npz")["labels"].tolist() == [3] * 4
    noise = noise_for_indices(range(4), (3, 16, 16), 0)
    expected = loaded.sample(noise, nfe=1, class_labels=torch.full((4,), 3))
    assert np.array_equal(np.load(fixed / "samples.npz")["images"], to_uint8(expected))


@pytest.mark.parametrize("preset", ["imagenet64", "ffhq64", "afhqv2-64", "cifar10-edm"])
def test_the_edm_presets_dry_run_with_an_imported_teacher(preset: str,
                                                          imported: dict[str, Path]) -> None:
    """`distill --preset P --teacher RUN --dry-run` prints what will run: the teacher's network
    and image size, and the preset's recipe on the teacher's own grid."""
    result = invoke("distill", "--preset", preset, "--teacher", imported["adm-cond"], "--dry-run")
    assert result.exit_code == 0, result.output
    spec = json.loads(result.stdout)
    assert spec["preset"] == preset
    assert spec["net"]["model"]["type"] == "DhariwalUNet" and spec["net"]["num_classes"] == 7
    assert spec["data"]["resolution"] == 16 and spec["distill"]["time_grid"] == "native"
    assert spec["distill"]["grid_steps"] == (40 if preset == "imagenet64" else 18)
