"""How fast `traflow sample` writes CIFAR-sized PNGs (uint8 32x32x3), with no network running.

Run: OMP_NUM_THREADS=1 pytest benchmarks/test_bench_writing.py
Each benchmark records `images_per_s` and `projected_50k_s` (seconds for 50,000 images) in its
extra_info (shown with --benchmark-json or --benchmark-verbose); images/s = 1000 / mean.

- encode only: PNG encoding in memory, one thread (the baseline: no file system);
- PNGWriter: encode + write + rename on 1, 2 or 4 threads, and at other zlib levels;
- pack npz: read the 1000 PNGs back and write samples.npz (what --format npz|both adds).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from traflow_cli.jobs.writers import PNGWriter, encode_png, read_pngs, save_npz

COUNT = 1000
# 300 CIFAR-10 test images (tests/fixtures/README.md), repeated to COUNT.
CIFAR_SAMPLE_ZIP = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cifar10-jpeg-test-300.zip"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """[COUNT, 32, 32, 3] uint8: real CIFAR-10 test images (PNG size depends on content), the
    repository's 300 repeated in order."""
    with zipfile.ZipFile(CIFAR_SAMPLE_ZIP) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        sample = np.stack([np.asarray(Image.open(zf.open(n)).convert("RGB")) for n in names])
    return sample[np.arange(COUNT) % len(sample)]


def _record(benchmark, **extra: object) -> None:
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(images_per_s=round(COUNT / mean),
                                projected_50k_s=round(50_000 * mean / COUNT, 1), **extra)


def test_encode_only(benchmark, images: np.ndarray) -> None:
    payloads = benchmark(lambda: [encode_png(im) for im in images])
    _record(benchmark, bytes_per_image=round(sum(map(len, payloads)) / COUNT))


def _write_fresh(benchmark, images: np.ndarray, tmp_path: Path, rounds: int,
                 **options: int) -> Path:
    """Time PNGWriter on a new folder each round (as in a run: creating files, not replacing
    them; replacing costs several times more on this file system). Returns the last folder."""
    folders = iter(tmp_path / f"round{i}" for i in range(rounds + 1))
    last: list[Path] = []

    def setup() -> tuple[tuple[Path], dict]:
        last[:] = [next(folders)]
        return (last[0],), {}

    def write(folder: Path) -> None:
        with PNGWriter(folder, **options) as writer:
            writer.write(range(COUNT), images)

    benchmark.pedantic(write, setup=setup, rounds=rounds, warmup_rounds=1)
    return last[0]


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_png_writer(benchmark, images: np.ndarray, tmp_path: Path, threads: int) -> None:
    folder = _write_fresh(benchmark, images, tmp_path, 5, threads=threads)
    np.testing.assert_array_equal(read_pngs(folder, COUNT), images)  # lossless
    _record(benchmark)


@pytest.mark.parametrize("level", [0, 6, 9])
def test_png_writer_compress_level(benchmark, images: np.ndarray, tmp_path: Path,
                                   level: int) -> None:
    folder = _write_fresh(benchmark, images, tmp_path, 3, threads=2, compress_level=level)
    size = sum(p.stat().st_size for p in folder.glob("*.png"))
    _record(benchmark, bytes_per_image=round(size / COUNT))


def test_pack_npz(benchmark, images: np.ndarray, tmp_path: Path) -> None:
    with PNGWriter(tmp_path / "out") as writer:
        writer.write(range(COUNT), images)
    benchmark.pedantic(lambda: save_npz(tmp_path / "samples.npz",
                                        images=read_pngs(tmp_path / "out", COUNT)),
                       rounds=3, warmup_rounds=1)
    _record(benchmark)
