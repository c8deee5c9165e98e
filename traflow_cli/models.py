"""A trained teacher or student read back from its run folder (weights and network description).

Jobs load models through here; `traflow_cli.api` re-exports the same names for notebooks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from traflow_cli.engine.checkpoint import CheckpointError, run_checkpoint
from traflow_cli.nets import build_net
from traflow_cli.sampling import sample_student, student_times
from traflow_cli.traflow import call_net, jump


class Teacher(nn.Module):
    """A rectified-flow teacher: velocity(x [B, ...] in [-1, 1], t [B] in [0, 1]) -> [B, ...]."""

    def __init__(self, net: nn.Module, config: dict) -> None:
        super().__init__()
        self.net = net
        self.config = config

    def velocity(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return call_net(self.net, x, t, labels=class_labels)

    forward = velocity


class Student(nn.Module):
    """A TraFlow student: jump(x, t, s) = G(x, t, s) = x + (s - t) u(x, t, s)."""

    def __init__(self, net: nn.Module, config: dict) -> None:
        super().__init__()
        self.net = net
        self.config = config

    def jump(self, x: Tensor, t: Tensor, s: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return jump(self.net, x, t, s, class_labels)

    forward = jump

    @torch.no_grad()
    def sample(self, noise: Tensor, nfe: int = 1, class_labels: Tensor | None = None) -> Tensor:
        """Samples from noise [B, ...] with `nfe` uniform jumps."""
        return sample_student(self.net, noise, student_times(nfe), labels=class_labels)


def _load_net(run_dir: str | Path, role: str, device: str | torch.device) -> tuple[nn.Module, dict]:
    """The network of a run folder's latest checkpoint (its EMA weights when saved) and its config."""
    ckpt = run_checkpoint(Path(run_dir))
    saved_role = ckpt.metadata.get("role")
    if saved_role != role:
        raise CheckpointError(f"{run_dir}: holds a {saved_role}, not a {role}")
    config = ckpt.net_config()
    net = build_net(config, target_time=role == "student")
    prefix = "ema" if "ema" in ckpt.prefixes() else "net"
    net.load_state_dict(ckpt.weights(prefix))
    return net.to(device).eval().requires_grad_(False), config


def load_teacher(run_dir: str | Path, device: str | torch.device = "cpu") -> Teacher:
    """The teacher of a `traflow teacher train|import` run folder (its EMA weights)."""
    net, config = _load_net(run_dir, "teacher", device)
    return Teacher(net, config).eval()


def load_student(run_dir: str | Path, device: str | torch.device = "cpu") -> Student:
    """The student of a `traflow distill` run folder (its evaluation-EMA weights)."""
    net, config = _load_net(run_dir, "student", device)
    return Student(net, config).eval()
