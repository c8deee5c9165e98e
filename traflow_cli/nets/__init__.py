"""Architectures. build_net turns a plain config dict (as stored in checkpoints) into a module."""

from __future__ import annotations

from typing import Any

from torch import nn


def build_net(config: dict[str, Any], *, target_time: bool = False) -> nn.Module:
    """Build a teacher (v(x, t)) or, with target_time=True, a student (u(x, t, s)) network."""
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    kind = config["kind"]
    if kind == "mlp":
        from traflow_cli.nets.mlp import MLPVelocity

        return MLPVelocity(target_time=target_time, **kwargs)
    if kind == "ncsnpp":
        from traflow_cli.nets.ncsnpp import NCSNpp

        for key in ("ch_mult", "attn_resolutions"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return NCSNpp(target_time=target_time, **kwargs)
    if kind == "edm":
        from traflow_cli.nets.edm import EDMNet

        return EDMNet(target_time=target_time, **kwargs)
    raise ValueError(f"unknown network kind {kind!r}; expected 'mlp', 'ncsnpp' or 'edm'")


def student_from_teacher(teacher: nn.Module, config: dict[str, Any]) -> nn.Module:
    """A student whose weights equal the teacher's, plus a zero-initialised s branch."""
    student = build_net(config, target_time=True)
    # Only the new s-branch may be missing; every teacher weight must find its place.
    _, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"teacher weights with no place in the student: {unexpected[:3]}")
    return student.to(next(teacher.parameters()).device)
