"""Shared fixtures: the CLI runner, the shared data folder, and a tiny trained toy teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from traflow_cli.cli.app import app

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_FIXTURES = SHARED / "fixtures"
LOCAL_FIXTURES = Path(__file__).resolve().parent / "fixtures"

# (checkpoint, io file, image size): networks of the official Rectified Flow code with their
# outputs (see fixtures/README.md); both conformance suites read them.
OFFICIAL_FIXTURES = {
    "shared-nf16": (SHARED_FIXTURES / "rf_ncsnpp_small.pth",
                    SHARED_FIXTURES / "rf_ncsnpp_small_io.pt", 32),
    "official-nf12": (LOCAL_FIXTURES / "rf_ncsnpp_nf12.pth",
                      LOCAL_FIXTURES / "rf_ncsnpp_nf12_io.pt", 16),
}

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
