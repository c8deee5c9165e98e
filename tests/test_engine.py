"""Engine: atomic checkpoints with a `latest` pointer, pruning, EMA arithmetic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from traflow_cli.engine import checkpoint as ckpt_module
from traflow_cli.engine.checkpoint import latest_checkpoint, save_checkpoint
from traflow_cli.engine.ema import make_ema, update_ema
from traflow_cli.engine.loop import TrainingDiverged, TrainTask, train
from traflow_cli.engine.runtime import setup_runtime


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


def _diverging_task(run_dir: Path, nonfinite: str, bad_steps: set[int],
                    total_steps: int = 20) -> TrainTask:
    """A real (tiny) regression whose loss is NaN at `bad_steps`, as a blown-up batch would be."""
    from traflow_cli.jobs.common import optimizer_step
    from traflow_cli.specs import TeacherSpec

    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    training = TeacherSpec(nonfinite=nonfinite, grad_clip=None)
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        loss = ((net(x) - y) ** 2).mean() * (float("nan") if step in bad_steps else 1.0)
        loss.backward()
        norm = optimizer_step(optimizer, list(net.parameters()), step, training)
        return {"loss": loss.detach(), "grad_norm": norm}

    return TrainTask(run_dir=run_dir, title="teacher", saved_modules={"net": net},
                     optimizer=optimizer, step_fn=step_fn, total_steps=total_steps, images_per_step=32,
                     metadata={"net_config": "{}", "role": "teacher"}, log_every_steps=5,
                     checkpoint_every_steps=5, keep_checkpoints=3, nonfinite=nonfinite)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    task = _diverging_task(tmp_path, "stop", bad_steps={7})
    with pytest.raises(TrainingDiverged, match="at step 8; nothing after step 5 was saved"):
        train(task, setup_runtime(device="cpu"))
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.step == 5 and all(torch.isfinite(w).all() for w in ckpt.weights("net").values())
    assert not (tmp_path / "checkpoints" / "step-000000010.safetensors").exists()


def test_skip_mode_leaves_the_weights_untouched_by_a_bad_step(tmp_path: Path) -> None:
    task = _diverging_task(tmp_path, "skip", bad_steps={7})
    summary = train(task, setup_runtime(device="cpu"))
    assert summary["steps"] == 20
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 1 and all(math.isfinite(r["loss"]) for r in rows)
    weights = latest_checkpoint(tmp_path / "checkpoints").weights("net")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_skip_mode_still_stops_a_run_that_keeps_diverging(tmp_path: Path) -> None:
    task = _diverging_task(tmp_path, "skip", bad_steps=set(range(3, 100)), total_steps=60)
    with pytest.raises(TrainingDiverged, match="steps in a row up to step 25"):
        train(task, setup_runtime(device="cpu"))


def test_resume_drops_metrics_rows_after_the_checkpoint(tmp_path: Path) -> None:
    from traflow_cli.engine.records import truncate_metrics

    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (5, 10, 15)) + '{"step": 2')
    truncate_metrics(tmp_path, 10)
    assert [json.loads(line)["step"] for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 10]


def test_the_dropout_stream_replays_no_other_stream() -> None:
    """A step's dropout masks (the global torch seed) come from their own stream: on any rank
    and step they are not the numbers of that step's time and noise draws, data, jitter or
    diagonal draws (an earlier seed on rank 0 was exactly the times' seed)."""
    from traflow_cli.seeding import derive_seed, dropout_seed

    for seed in (0, 7):
        others = {derive_seed(seed, tag, step) for tag in range(12) for step in range(40)}
        others |= {derive_seed(seed, 2, step, rank) for step in range(40) for rank in range(16)}
        mine = {dropout_seed(seed, rank, step) for rank in range(16) for step in range(40)}
        assert len(mine) == 16 * 40 and not mine & others
