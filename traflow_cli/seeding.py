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
