"""Inception feature extraction on CPU at several batch sizes (what `eval fid --batch-size` sets).

Run on a quiet machine: pytest benchmarks/test_bench_fid.py
Each benchmark records `s_per_image` in its extra_info; the CPU default (8) comes from here.
Skipped when no Inception network is available offline.
"""

from __future__ import annotations

import pytest
import torch

from traflow_cli.metrics.fid import FIDError
from traflow_cli.metrics.inception import load_inception

IMAGES = 96  # a multiple of every batch size below


@pytest.fixture(scope="module")
def inception() -> torch.nn.Module:
    try:
        model, _ = load_inception("cpu", allow_download=False)
    except FIDError as exc:
        pytest.skip(f"no offline Inception network: {exc}")
    return model


@pytest.mark.parametrize("batch", [8, 32, 96])
def test_inception_features(benchmark, inception: torch.nn.Module, batch: int) -> None:
    # 16x16 CIFAR-sized pictures: legacy_tensorflow resizes inside the network, so the cost is
    # Inception's at 299x299 whatever the input size.
    pixels = torch.rand(IMAGES, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255

    def features() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([inception(pixels[i:i + batch]) for i in range(0, IMAGES, batch)])

    out = benchmark.pedantic(features, rounds=2, warmup_rounds=1)
    assert out.shape == (IMAGES, 2048) and torch.isfinite(out).all()
    benchmark.extra_info["s_per_image"] = round(benchmark.stats.stats.mean / IMAGES, 4)
