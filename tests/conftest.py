"""Shared fixtures: the CLI runner, the paths of every file the suite reads (all under
tests/fixtures/, see its README.md), and a tiny trained toy teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from traflow_cli.cli.app import app

# Every file the suite reads lives in the repository, here (a clone tests itself).
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# (checkpoint, io file, image size): networks of the official Rectified Flow code with their
# outputs (see fixtures/README.md); both conformance suites read them.
OFFICIAL_FIXTURES = {
    "official-nf16": (FIXTURES / "rf_ncsnpp_small.pth", FIXTURES / "rf_ncsnpp_small_io.pt", 32),
    "official-nf12": (FIXTURES / "rf_ncsnpp_nf12.pth", FIXTURES / "rf_ncsnpp_nf12_io.pt", 16),
}
# Parameter names and shapes of the official CIFAR-10 DDPM++ (62M parameters, no weights).
RF_CIFAR10_KEYS = FIXTURES / "rf_cifar10_ddpmpp_keys.json"
# NVlabs/edm network snapshots with their outputs (fixtures/edm/README.md, fixtures/README.md).
EDM_FIXTURES = FIXTURES / "edm"
# 300 CIFAR-10 test images (30 per class) as an EDM dataset-tool zip: CLASS/NNNN.jpg entries and
# dataset.json. Made by fixtures/make_cifar10_sample.py from the full 10,000-image JPEG test zip.
CIFAR10_SAMPLE_ZIP = FIXTURES / "cifar10-jpeg-test-300.zip"

# Small enough to train in seconds on 2 cores, large enough to learn the ring's eight modes.
TINY_TOY = ["--set", "net.hidden=64", "--set", "teacher.batch_size=256",
            "--set", "teacher.log_every_steps=50", "--set", "teacher.checkpoint_every_steps=100"]


def invoke(*args: str):
    """Run `traflow ARGS` in-process; returns the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy2d teacher trained for 300 steps with a narrow MLP (shared by many tests)."""
    run = tmp_path_factory.mktemp("toy") / "teacher"
    result = invoke("teacher", "train", "--out", run, "--steps", "300", "--device", "cpu",
                    *TINY_TOY)
    assert result.exit_code == 0, result.output
    return run
