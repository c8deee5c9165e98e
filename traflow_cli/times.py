"""The rule for a student's sampling times, stdlib only: the spec and the sampler both apply it.

Core (grids.py) may not import pydantic and specs.py may not import torch, so the one
definition lives here, below both (METHOD.md, "Sampling the student").
"""

from __future__ import annotations

from collections.abc import Sequence


def check_sampling_times(times: Sequence[float], nfe: int) -> None:
    """Raise ValueError unless times is 0 = t_0 < t_1 < ... < t_nfe = 1 (nfe + 1 entries)."""
    if len(times) != nfe + 1:
        raise ValueError(f"times has {len(times)} entries; nfe={nfe} needs {nfe + 1} "
                         "(from 0 to 1)")
    if times[0] != 0 or times[-1] != 1 or any(b <= a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError("times must increase strictly from 0 to 1")
