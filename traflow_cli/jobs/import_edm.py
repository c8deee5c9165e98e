"""`traflow teacher import edm`: an NVlabs/edm snapshot becomes a teacher run folder.

The snapshot is read as data (nothing in it runs), its `ema` network rebuilt as our EDMNet with
every tensor checked by name and shape, and written like a Rectified Flow import: spec.json,
summary.json and checkpoints/ (safetensors, the network description in the metadata, with the
teacher's native time grid: EDM's Karras grid, solved by Heun in EDM's coordinates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from traflow_cli.interop.edm import check_edm_weights, read_edm_snapshot
from traflow_cli.jobs.common import net_metadata
from traflow_cli.jobs.teacher import check_import_target, write_teacher_import
from traflow_cli.nets import build_net
from traflow_cli.presets import load_preset, resolve_spec
from traflow_cli.specs import RunSpec, SpecError, is_toy_data

# How EDM's sampler solves these teachers (and so how `sample` and `distill` should by default).
NATIVE_GRID = "karras"
NATIVE_SOLVER = "heun"


def default_preset(net_config: dict[str, Any]) -> str:
    """The preset an EDM network fits: ImageNet-64 (conditional), FFHQ-64 (an AFHQv2 file
    looks the same: pass --preset afhqv2-64), else CIFAR-10's EDM preset."""
    if net_config["image_size"] == 64:
        return "imagenet64" if net_config["num_classes"] else "ffhq64"
    return "cifar10-edm"


def edm_teacher_spec(net_config: dict[str, Any], preset: str | None,
                     sets: list[str] | None) -> RunSpec:
    """The preset's spec around the imported network: its net, resolution, channels, labels."""
    preset = preset or default_preset(net_config)
    if is_toy_data(load_preset(preset).get("data")):
        raise SpecError(f"--preset: {preset!r} is a toy (2-D) preset; an EDM teacher needs an "
                        f"image preset, e.g. --preset {default_preset(net_config)}")
    values = {"net": net_config, "data.resolution": net_config["image_size"],
              "data.channels": net_config["in_channels"],
              "data.use_labels": net_config["num_classes"] > 0}
    return resolve_spec(preset, sets, values)


def import_edm_teacher(path: Path, run_dir: Path, *, preset: str | None = None,
                       sets: list[str] | None = None) -> dict[str, Any]:
    """Write a teacher run folder from an EDM snapshot's `ema` network, checked in full.

    Re-importing into a folder written by an earlier import replaces it; a folder holding any
    other run is refused. The preset defaults to the one the network fits (default_preset).
    """
    check_import_target(run_dir)  # before reading a large file; again under the lock
    snapshot = read_edm_snapshot(path)
    spec = edm_teacher_spec(snapshot.config, preset, sets)
    config = spec.net_config()
    # The spec may have normalised the description (e.g. --set net.model...): it must still
    # build a network that holds exactly the file's tensors.
    check_edm_weights(config, snapshot.weights, path)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        net = build_net(config)
    sigma_lo, sigma_hi = net.sigma_range
    metadata = net_metadata(config, "teacher", source=str(path), weights="ema", family="edm",
                            native_grid=NATIVE_GRID, native_solver=NATIVE_SOLVER)
    summary = {"job": "teacher-import", "family": "edm", "source": str(path),
               "preset": spec.preset, "parameters": sum(p.numel() for p in net.parameters()),
               "precond": snapshot.precond_class, "model": snapshot.model_class,
               "image_size": config["image_size"], "in_channels": config["in_channels"],
               "num_classes": config["num_classes"], "sigma_min": sigma_lo,
               "sigma_max": sigma_hi, "native_grid": NATIVE_GRID,
               "native_solver": NATIVE_SOLVER, "file_use_fp16": snapshot.use_fp16}
    return write_teacher_import(run_dir, spec, snapshot.weights, metadata, summary)

