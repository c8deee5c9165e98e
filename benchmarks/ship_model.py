"""Make a small run folder to ship with the tool (models/): a finished run's sampling weights only.

The shipped folder keeps the run's record (spec.json, summary.json) and one checkpoint holding
the evaluation EMA weights (the weights `load_teacher`, `load_student`, `traflow sample` and
`traflow distill --teacher` read), without the optimiser state and the training copies: a third
of the run's checkpoint. Paths on the machine that trained it are replaced by where the shipped
folders sit in the repository.

Usage: python benchmarks/ship_model.py RUN_DIR OUT_DIR [--teacher SHIPPED_TEACHER_DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from traflow_cli.engine.checkpoint import run_checkpoint, save_checkpoint  # noqa: E402
from traflow_cli.engine.records import atomic_write_bytes  # noqa: E402
from traflow_cli.models import load_teacher  # noqa: E402
from traflow_cli.runfolder import read_record  # noqa: E402


def ship(run_dir: Path, out: Path, teacher: str | None) -> Path:
    """Write OUT with RUN's record and its EMA weights; returns the checkpoint written."""
    record = read_record(run_dir)
    if record is None:
        raise SystemExit(f"{run_dir}: not a run folder (no spec.json)")
    ckpt = run_checkpoint(run_dir)
    prefix = "ema" if "ema" in ckpt.prefixes() else "net"
    metadata = {k: v for k, v in ckpt.metadata.items() if k not in ("format", "step")}
    spec = record["spec"]
    spec.get("data", {})["path"] = None  # the trainer's data path means nothing elsewhere
    if "distill" in spec:  # nor does a cache file shared by the trainer's runs
        spec["distill"]["trajectory_cache_file"] = None
    if teacher is not None:  # the shipped teacher: its path and its weights file's digest
        metadata["teacher"] = teacher
        metadata["teacher_sha256"] = load_teacher(teacher).sha256 or ""
        spec["distill"]["teacher"] = teacher
    record["shipped_from"] = {"step": ckpt.step, "weights": prefix}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "spec.json", (json.dumps(record, indent=1) + "\n").encode())
    written = save_checkpoint(out / "checkpoints", step=ckpt.step,
                              modules={"ema": ckpt.weights(prefix)}, trainer_state={},
                              metadata=metadata, keep=1)
    summary = run_dir / "summary.json"
    if summary.is_file():
        record = json.loads(summary.read_text())
        record["checkpoint"] = str(written)
        atomic_write_bytes(out / "summary.json", (json.dumps(record, indent=1) + "\n").encode())
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--teacher", default=None,
                        help="for a student: its shipped teacher's folder, as recorded")
    args = parser.parse_args()
    print(ship(args.run_dir, args.out, args.teacher))


if __name__ == "__main__":
    main()
