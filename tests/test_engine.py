"""Engine: atomic checkpoints with a `latest` pointer, pruning, EMA arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from traflow_cli.engine import checkpoint as ckpt_module
from traflow_cli.engine.checkpoint import latest_checkpoint, save_checkpoint
from traflow_cli.engine.ema import make_ema, update_ema


def _save(folder: Path, step: int, value: float, keep: int = 2) -> Path:
    return save_checkpoint(folder, step=step, modules={"net": {"w": torch.full((3,), value)}},
                           trainer_state={"optimizer": {"lr": 0.1}},
                           metadata={"net_config": "{}", "role": "teacher"}, keep=keep)


def test_checkpoint_round_trip_with_safe_loading(tmp_path: Path) -> None:
    _save(tmp_path, 10, 1.5)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.step == 10
    assert torch.equal(ckpt.weights("net")["w"], torch.full((3,), 1.5))
    state = torch.load(ckpt.state_path, weights_only=True)  # no pickled code inside
    assert state == {"optimizer": {"lr": 0.1}, "step": 10}
    assert ckpt.metadata["role"] == "teacher"


def test_latest_moves_and_old_checkpoints_are_pruned(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step, float(step), keep=2)
    assert latest_checkpoint(tmp_path).step == 3
    assert sorted(p.name for p in tmp_path.glob("step-*.safetensors")) == [
        "step-000000002.safetensors", "step-000000003.safetensors"]


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, 1, 1.0)

    def disk_full(*args: object, **kwargs: object) -> bytes:
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_module, "safetensors_bytes", disk_full)
    with pytest.raises(OSError):
        _save(tmp_path, 2, 2.0)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.step == 1 and torch.equal(ckpt.weights("net")["w"], torch.ones(3))
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written file under a final name


def test_latest_falls_back_to_the_newest_complete_pair(tmp_path: Path) -> None:
    _save(tmp_path, 1, 1.0)
    _save(tmp_path, 2, 2.0)
    (tmp_path / "latest").unlink()
    (tmp_path / "step-000000002.state.pt").unlink()  # an interrupted pair does not count
    assert latest_checkpoint(tmp_path).step == 1


def test_ema_update_is_the_exponential_average() -> None:
    source = nn.Linear(2, 2)
    ema = make_ema(source)
    before = ema.weight.clone()
    with torch.no_grad():
        source.weight.add_(1.0)
    update_ema(ema, source, 0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * source.weight)
    assert not ema.weight.requires_grad
    update_ema(ema, source, 0.0)
    assert torch.equal(ema.weight, source.weight)
