"""`traflow teacher reflow`: 2-rectified flow from a teacher run, top to bottom (METHOD.md).

1. Read the parent teacher once (record, checkpoint, weights) and check the spec's network is its.
2. Pairs: `reflow.pairs` noises z (with a class each for a conditional parent) and the parent's
   ODE solution Phi(z, 0 -> 1), `reflow.solver_steps` steps of `reflow.solver` on a uniform grid;
   solved once and kept in the run folder (`reflow_pairs.safetensors`, checked by digest and key
   like distill's trajectory cache, and naming the parent's weights).
3. Train from the parent's weights with the rectified-flow loss on x_t = t Phi(z) + (1 - t) z,
   target Phi(z) - z: the teacher job's own step, fed the coupled pairs. The result is a teacher
   run folder (`distill --teacher`, `sample`, `load_teacher` take it); its spec.json names the
   parent (`reflow.parent`) and its checkpoints the parent's digest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from traflow_cli.grids import time_grid
from traflow_cli.jobs.common import (
    RunClaim,
    claim_run_dir,
    net_metadata,
    run_training,
    runtime_for,
    sample_shape,
)
from traflow_cli.jobs.distill import check_same_teacher, teacher_trajectories
from traflow_cli.jobs.teacher import build_teacher_step
from traflow_cli.models import Teacher, load_teacher
from traflow_cli.specs import RunSpec, SpecError, check_teacher_run

SECTIONS = ("seed", "net", "reflow")


def open_parent(spec: RunSpec) -> Teacher:
    """The parent teacher of spec.reflow.parent: a rectified flow with the spec's network."""
    check_teacher_run(spec.reflow.parent, flag="reflow.parent")
    parent = load_teacher(spec.reflow.parent)
    if parent.config != spec.net_config():
        raise SpecError(f"net: differs from the parent's network in {spec.reflow.parent}; the "
                        "reflowed teacher keeps its parent's network: drop the net overrides")
    if parent.sigma_range is not None:
        raise SpecError(f"reflow.parent: {spec.reflow.parent} is an EDM teacher; reflow retrains "
                        "a rectified flow on its own straight path (distill it instead)")
    return parent


def reflow(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """Train a 2-rectified flow from spec.reflow.parent; resumes from run_dir if started."""
    parent = open_parent(spec)
    runtime = runtime_for(spec)
    with claim_run_dir(run_dir, spec, job="teacher", sections=SECTIONS, runtime=runtime) as claim:
        return _reflow(spec, claim, parent)


def _reflow(spec: RunSpec, claim: RunClaim, parent: Teacher) -> dict[str, Any]:
    cfg, runtime = spec.reflow, claim.runtime
    if claim.resumed:
        check_same_teacher(claim.run_dir, parent, cfg.parent, field="reflow.parent")
    claim.write_record()  # the parent read and checked: the inputs are good
    config = spec.net_config()
    net = runtime.place(parent.net)
    noise, ends, labels = teacher_trajectories(
        net, sample_shape(config), count=cfg.pairs, seed=spec.seed,
        grid=time_grid(cfg.solver_steps, device=runtime.device), solver=cfg.solver,
        device=runtime.device, cache_file=claim.run_dir / "reflow_pairs.safetensors",
        num_classes=config.get("num_classes", 0), teacher_sha256=parent.sha256, ends_only=True)
    step = build_teacher_step(spec, runtime, section=cfg, init=parent.net,
                              pairs=(noise, ends[0], labels))
    metadata = net_metadata(config, "teacher", parent=str(cfg.parent),
                            teacher_sha256=parent.sha256 or "")
    return run_training("reflow", claim, runtime, cfg, step, metadata)
