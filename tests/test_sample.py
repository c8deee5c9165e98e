"""`traflow sample` on tiny image models: per-index determinism, resume, NFE, formats, classes.

The teacher is tests/fixtures/rf_ncsnpp_nf12.pth (an official Rectified Flow checkpoint with
random weights) imported at 16x16; the student is one distillation step from it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import OFFICIAL_FIXTURES, invoke
from PIL import Image

from traflow_cli.jobs import sample as sample_job
from traflow_cli.jobs.writers import PNGWriter, existing_indices, missing_indices, read_pngs

FIXTURE = OFFICIAL_FIXTURES["official-nf12"][0]
PRESET = """preset = "tiny16"
[data]
name = "cifar10"
resolution = 16
[net]
kind = "ncsnpp"
[sample]
num_samples = 10
batch_size = 4
solver = "euler"
steps = 2
"""

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "tiny16.toml"
    path.write_text(PRESET)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, preset: Path) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "t16"
    result = invoke("teacher", "import", "rectified-flow", FIXTURE, "--image-size", "16",
                    "--preset", preset, "--out", run)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory, teacher: Path, preset: Path) -> Path:
    run = tmp_path_factory.mktemp("student") / "s16"
    result = invoke("distill", "--teacher", teacher, "--preset", preset, "--steps", "1",
                    "--device", "cpu", "--set", "distill.batch_size=2",
                    "--set", "distill.grid_steps=2", "--set", "distill.trajectory_cache=0",
                    "--out", run)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def conditional_teacher(tmp_path_factory: pytest.TempPathFactory, preset: Path) -> Path:
    """A 3-class NCSN++ teacher with random weights, written as a teacher run folder."""
    import torch

    from traflow_cli.engine.checkpoint import save_checkpoint
    from traflow_cli.engine.records import write_spec_record
    from traflow_cli.jobs.common import net_metadata
    from traflow_cli.nets import build_net
    from traflow_cli.presets import resolve_spec

    config = {"kind": "ncsnpp", "image_size": 16, "in_channels": 3, "nf": 8, "ch_mult": [1, 2],
              "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0, "num_classes": 3}
    spec = resolve_spec(str(preset), [f"net.{k}={json.dumps(v)}" for k, v in config.items()])
    net = build_net(spec.net_config())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():  # init_scale=0 leaves the output ~0; make labels matter
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    run = tmp_path_factory.mktemp("cond") / "teacher"
    write_spec_record(run, job="teacher", spec=spec.model_dump(mode="json"), fingerprint="test")
    save_checkpoint(run / "checkpoints", step=0, modules={"ema": net.state_dict()},
                    trainer_state={}, metadata=net_metadata(spec.net_config(), "teacher"))
    return run


def sample(run: Path, out: Path, *args: str) -> dict:
    result = invoke("sample", run, "--out", out, "--device", "cpu", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def pixels(folder: Path, count: int) -> np.ndarray:
    return read_pngs(folder / "images", count)


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


# ---- which image index i holds ------------------------------------------------------------


@pytest.fixture
def model_run(request: pytest.FixtureRequest) -> Path:
    """The run folder of the fixture named by the parameter (set up before the test's clock)."""
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("model_run", ["teacher", "student"], indirect=True)
def test_same_images_whatever_the_batch_size(model_run: Path, tmp_path: Path) -> None:
    run = model_run
    a = sample(run, tmp_path / "b3", "-n", "10", "--batch-size", "3", "--nfe", "2")
    b = sample(run, tmp_path / "b7", "-n", "10", "--batch-size", "7", "--nfe", "2")
    assert a["made_now"] == b["made_now"] == 10
    first, second = png_bytes(tmp_path / "b3"), png_bytes(tmp_path / "b7")
    assert list(first) == [f"{i:06d}.png" for i in range(10)]
    assert first == second
    # Different indices are different images (the noise really is per index).
    assert len({v for v in first.values()}) == 10


def test_gamma_sampling_noise_is_per_index_too(student: Path, tmp_path: Path) -> None:
    args = ("-n", "6", "--nfe", "3", "--set", "sample.gamma=0.5")
    sample(student, tmp_path / "b2", *args, "--batch-size", "2")
    sample(student, tmp_path / "b6", *args, "--batch-size", "6")
    plain = sample(student, tmp_path / "g0", "-n", "6", "--nfe", "3")
    assert png_bytes(tmp_path / "b2") == png_bytes(tmp_path / "b6")
    assert plain["made_now"] == 6
    assert not np.array_equal(pixels(tmp_path / "b2", 6), pixels(tmp_path / "g0", 6))


def test_rk45_steps_each_sample_as_if_it_were_alone() -> None:
    """Per-sample step control: in a batch, each sample takes the steps it takes alone.

    (Through a network, float32 rounding that depends on the batch size, ~1e-6, can still tip
    an accept/reject decision; on the random-weight fixture that moves a few pixels by 1-3/255.)
    """
    import torch

    from traflow_cli.flow import solve_rk45, solve_rk45_per_sample

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    rates = torch.tensor([-2.0, -1.0, 0.5, 1.0, 3.0]).view(5, 1)

    def field(x, t, rows):  # dx/dt = r (1 + 3t) x: x(1) = x(0) exp(2.5 r)
        return rates[rows] * x * (1 + 3 * t.view(-1, 1))

    out, nfe = solve_rk45_per_sample(field, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(out, x * torch.exp(2.5 * rates), rtol=1e-5, atol=1e-5)
    for i in range(5):
        alone, alone_nfe = solve_rk45(lambda y, t, i=i: field(y, t, torch.tensor([i])),
                                      x[i:i + 1], rtol=1e-8, atol=1e-8)
        assert torch.equal(alone, out[i:i + 1]) and alone_nfe == int(nfe[i])
    assert len(set(nfe.tolist())) > 1  # the stiffer samples took more steps


# ---- resume -------------------------------------------------------------------------------


def test_resume_after_lost_files_and_a_crash_equals_one_run(teacher: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    whole = tmp_path / "whole"
    sample(teacher, whole, "-n", "10")
    part = tmp_path / "part"
    # Interrupted: the third batch raises, as a killed process would stop.
    real_generate = sample_job.generate
    calls = {"n": 0}

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("power cut")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sample_job, "generate", dies_on_third)
    result = invoke("sample", teacher, "--out", part, "-n", "10", "--batch-size", "3")
    assert result.exit_code != 0
    monkeypatch.undo()
    assert sorted(existing_indices(part / "images")) == list(range(6))
    (part / "images" / ".000011.png.tmp").write_bytes(b"half a png")  # a write cut short
    resumed = sample(teacher, part, "-n", "10", "--batch-size", "4")
    assert resumed["made_now"] == 4
    assert not list((part / "images").glob(".*.tmp"))
    # Files lost afterwards are made again, and only they.
    for i in (0, 5, 9):
        (part / "images" / f"{i:06d}.png").unlink()
    again = sample(teacher, part, "-n", "10")
    assert again["made_now"] == 3
    assert png_bytes(part) == png_bytes(whole)
    # Asking for more extends the run; asking again does nothing.
    assert sample(teacher, part, "-n", "12")["made_now"] == 2
    assert sample(teacher, part, "-n", "12")["made_now"] == 0
    np.testing.assert_array_equal(pixels(part, 10), pixels(whole, 10))


def test_resume_refuses_other_settings(teacher: Path, tmp_path: Path) -> None:
    sample(teacher, tmp_path / "s", "-n", "4")
    result = invoke("sample", teacher, "--out", tmp_path / "s", "-n", "4", "--steps", "3")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out:")
    assert "sample.steps: 2 -> 3" in lines[0]
    # Batch size, count and format are free to change.
    assert sample(teacher, tmp_path / "s", "-n", "5", "--batch-size", "2",
                  "--format", "both")["made_now"] == 1


# ---- NFE ----------------------------------------------------------------------------------


def _count_network_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = sample_job.load_model

    def counting(run_dir, device):
        model = real(run_dir, device)
        model.net.register_forward_hook(lambda *_: calls.append(1))
        return model

    monkeypatch.setattr(sample_job, "load_model", counting)
    return calls


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_student_nfe_is_exact(student: Path, tmp_path: Path, nfe: int,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_network_calls(monkeypatch)
    out = sample(student, tmp_path / "s", "-n", "6", "--batch-size", "3", "--nfe", str(nfe))
    assert out["role"] == "student" and out["nfe"] == out["nfe_max"] == nfe
    assert len(calls) == 2 * nfe  # two batches


def test_explicit_times_set_the_number_of_jumps(student: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # --times alone: its count sets the NFE, and the jumps differ from the default grid's.
    calls = _count_network_calls(monkeypatch)
    out = sample(student, tmp_path / "t", "-n", "3", "--times", "0,0.6,1", "--format", "npz")
    assert out["nfe"] == 2 and len(calls) == 2
    default = sample(student, tmp_path / "d", "-n", "3", "--nfe", "2", "--format", "npz")
    a, b = (np.load(Path(r["out"]) / "samples.npz")["images"] for r in (out, default))
    assert not np.array_equal(a, b)


def test_teacher_fixed_step_nfe(teacher: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_network_calls(monkeypatch)
    out = sample(teacher, tmp_path / "h", "-n", "3", "--solver", "heun", "--steps", "3")
    assert out["nfe"] == 6 and len(calls) == 6


def test_teacher_rk45_reports_the_nfe_it_used(teacher: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_network_calls(monkeypatch)
    out = sample(teacher, tmp_path / "r", "-n", "2", "--solver", "rk45",
                 "--set", "sample.rtol=1e-2", "--set", "sample.atol=1e-2")
    assert out["solver"] == "rk45"
    # 1 + 6 per attempted step, per sample; the batch calls the network as often as its
    # slowest sample needs.
    assert out["nfe"] > 6 and out["nfe_max"] >= out["nfe"]
    assert (out["nfe_max"] - 1) % 6 == 0
    assert len(calls) == out["nfe_max"]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["nfe"] == out["nfe"]


# ---- what the folder holds ----------------------------------------------------------------


def test_folder_layout_grid_and_progress(teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    result = invoke("sample", teacher, "--out", out, "-n", "10", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "10/10" in result.stderr  # rich progress goes to stderr
    assert {p.name for p in out.iterdir()} == {"images", "grid.png", "spec.json", "source.json",
                                               "summary.json", ".lock"}  # .lock: see runfolder.py
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 16, 8 * 16, 3)
    first = pixels(out, 10)
    np.testing.assert_array_equal(grid[:16, 16:32], first[1])
    np.testing.assert_array_equal(grid[16:, :16], first[8])
    assert json.loads((out / "spec.json").read_text())["job"] == "sample"


def test_format_npz_is_what_eval_fid_reads(teacher: Path, tmp_path: Path) -> None:
    from traflow_cli.metrics.fid import open_image_set

    sample(teacher, tmp_path / "png", "-n", "10")
    both = sample(teacher, tmp_path / "both", "-n", "10", "--format", "both")
    only = sample(teacher, tmp_path / "npz", "-n", "10", "--format", "npz")
    assert both["npz"] and only["images"] is None
    reference = pixels(tmp_path / "png", 10)
    for name in ("both", "npz"):
        with np.load(tmp_path / name / "samples.npz") as archive:
            assert archive.files == ["images"]  # unconditional: no labels
            images = archive["images"]
        assert images.dtype == np.uint8 and images.shape == (10, 16, 16, 3)  # NHWC
        np.testing.assert_array_equal(images, reference)
        opened = open_image_set(tmp_path / name / "samples.npz")
        assert len(opened) == 10 and opened.size == (16, 16)
    assert not (tmp_path / "npz" / "images").exists()  # npz alone: the PNGs were packed
    assert (tmp_path / "both" / "images" / "000009.png").is_file()
    # A larger -n on an npz-only folder makes only the new samples.
    more = sample(teacher, tmp_path / "npz", "-n", "12", "--format", "npz")
    assert more["made_now"] == 2
    with np.load(tmp_path / "npz" / "samples.npz") as archive:
        np.testing.assert_array_equal(archive["images"][:10], reference)
        assert archive["images"].shape[0] == 12


def test_class_labels_fixed_or_cycling(conditional_teacher: Path, tmp_path: Path) -> None:
    cycle = sample(conditional_teacher, tmp_path / "cycle", "-n", "6", "--format", "both")
    assert cycle["made_now"] == 6
    with np.load(tmp_path / "cycle" / "samples.npz") as archive:
        np.testing.assert_array_equal(archive["labels"], [0, 1, 2, 0, 1, 2])
        cycled = archive["images"]
    sample(conditional_teacher, tmp_path / "two", "-n", "6", "--class", "2", "--format", "both")
    with np.load(tmp_path / "two" / "samples.npz") as archive:
        np.testing.assert_array_equal(archive["labels"], [2] * 6)
        fixed = archive["images"]
    # Same noise: index 2 (class 2 either way) agrees; index 0 (class 0 vs 2) does not.
    np.testing.assert_array_equal(cycled[2], fixed[2])
    assert not np.array_equal(cycled[0], fixed[0])
    # RK45 drops finished samples from the batch; their labels must follow the rest.
    rk45 = sample(conditional_teacher, tmp_path / "rk45", "-n", "3", "--solver", "rk45",
                  "--set", "sample.rtol=1e-2", "--set", "sample.atol=1e-2")
    assert rk45["made_now"] == 3 and rk45["nfe"] > 0


@pytest.mark.parametrize(("model_run", "label"), [("conditional_teacher", "3"), ("teacher", "0")],
                         indirect=["model_run"])
def test_class_label_out_of_range_is_one_error_line(model_run: Path, label: str,
                                                    tmp_path: Path) -> None:
    result = invoke("sample", model_run, "--out", tmp_path / "x", "-n", "2", "--class", label)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sample.class_label:"), result.stderr


# ---- the writer on its own ----------------------------------------------------------------


def test_png_writer_is_lossless_and_reports_failures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    with PNGWriter(tmp_path / "rgb", threads=2, max_pending=2) as writer:
        writer.write([0, 1, 2, 3, 4], rgb)
    np.testing.assert_array_equal(read_pngs(tmp_path / "rgb", 5), rgb)
    with PNGWriter(tmp_path / "grey") as writer:
        writer.write([0, 1], grey)
    np.testing.assert_array_equal(read_pngs(tmp_path / "grey", 2), grey)
    assert missing_indices(tmp_path / "rgb", 7) == [5, 6]
    writer = PNGWriter(tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")
    writer.write([0], rgb[:1])
    with pytest.raises(OSError):
        writer.close()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
@pytest.mark.parametrize("started", ["in the foreground", "with SIGINT ignored"])
def test_ctrl_c_keeps_what_was_made_and_says_how_to_resume(student: Path, tmp_path: Path,
                                                            started: str) -> None:
    # "with SIGINT ignored": how a script's background job (`traflow sample ... &`) starts; the
    # signal must still stop it cleanly, as it stops the training jobs.
    out = tmp_path / "samples"
    # Enough samples that the run cannot end before the signal lands, even on a fast machine
    # (600 took 1.1 s on one; this is several seconds there, and the resume below writes them).
    total = 3000
    args = [sys.executable, "-m", "traflow_cli", "sample", str(student), "-n", str(total),
            "--batch-size", "4", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ignore_sigint if started != "in the foreground" else None)
    deadline = time.time() + 120
    while len(existing_indices(out / "images")) < 8:
        assert proc.poll() is None and time.time() < deadline, "it ended before Ctrl-C"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Re-run the same command" in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    made = existing_indices(out / "images")
    assert made and not list((out / "images").glob(".*tmp"))  # whole files only
    result = invoke("sample", student, "-n", str(total), "--batch-size", "4", "--out", out,
                    "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["made_now"] == total - len(made)
