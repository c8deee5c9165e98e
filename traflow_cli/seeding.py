"""Seeds derived from integers alone, so batch size, GPU count and resumption change nothing."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (e.g. seed, rank, step or seed, sample index)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator_for(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded from `parts`."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


# Stream tags in use (seed, TAG, ...): 0 a step's times and noise, 1 toy data, 2 image batches,
# 3 the trajectory cache's noise, 4-8 evaluation and bench draws and initial weights, 9 jitter,
# 10 diagonal draws. Dropout has its own, so its masks never replay another stream's numbers.
DROPOUT_STREAM = 12


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The global torch seed of a training step (dropout, label dropout): one per process and
    step, apart from every generator_for stream."""
    return derive_seed(seed, DROPOUT_STREAM, rank, step)
