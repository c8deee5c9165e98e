"""Atomic, resumable checkpoints.

A checkpoint is two files in `checkpoints/`: `step-NNNNNNNNN.safetensors` (every module's
weights, prefixed by its name, with the network description in the metadata) and
`step-NNNNNNNNN.state.pt` (optimizer state and counters, loadable with weights_only=True).
Each is written under a temporary name, synced and renamed; only then does `latest` move, and
only then are old checkpoints pruned. A crash at any point leaves the previous one intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from traflow_cli.engine.records import atomic_write_bytes
from traflow_cli.errors import UserError

FORMAT = "traflow-checkpoint/1"


class CheckpointError(UserError, RuntimeError):
    """A run folder without a usable checkpoint (one line: where and what is missing)."""


@dataclass
class Checkpoint:
    path: Path                       # the .safetensors file
    step: int
    metadata: dict[str, str]

    @property
    def state_path(self) -> Path:
        return self.path.with_name(self.path.name.replace(".safetensors", ".state.pt"))

    def weights(self, prefix: str) -> dict[str, Tensor]:
        """The state dict saved under `prefix` (e.g. "ema"), on the CPU."""
        out = {}
        with safe_open(self.path, framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key.startswith(prefix + "."):
                    out[key[len(prefix) + 1:]] = handle.get_tensor(key)
        if not out:
            raise CheckpointError(f"{self.path}: no weights saved under {prefix!r}")
        return out

    def prefixes(self) -> set[str]:
        with safe_open(self.path, framework="pt", device="cpu") as handle:
            return {key.split(".", 1)[0] for key in handle.keys()}

    def trainer_state(self) -> dict[str, Any]:
        return torch.load(self.state_path, map_location="cpu", weights_only=True)

    def net_config(self) -> dict[str, Any]:
        return json.loads(self.metadata["net_config"])


def _stem(step: int) -> str:
    return f"step-{step:09d}"


def save_checkpoint(folder: Path, *, step: int, modules: dict[str, dict[str, Tensor]],
                    trainer_state: dict[str, Any], metadata: dict[str, str], keep: int = 2) -> Path:
    """Write one checkpoint atomically, move `latest` to it, then prune to the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{key}": value.detach().to("cpu").contiguous()
               for name, state in modules.items() for key, value in state.items()}
    meta = {"format": FORMAT, "step": str(step), **metadata}
    stem = _stem(step)
    state_bytes = _torch_bytes({**trainer_state, "step": step})
    atomic_write_bytes(folder / f"{stem}.state.pt", state_bytes)
    atomic_write_bytes(folder / f"{stem}.safetensors", safetensors_bytes(tensors, metadata=meta))
    atomic_write_bytes(folder / "latest", (stem + "\n").encode())
    _prune(folder, keep)
    return folder / f"{stem}.safetensors"


def _torch_bytes(obj: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _prune(folder: Path, keep: int) -> None:
    stems = sorted(p.name.removesuffix(".safetensors") for p in folder.glob("step-*.safetensors"))
    for stem in stems[:-keep]:
        for suffix in (".safetensors", ".state.pt"):
            (folder / f"{stem}{suffix}").unlink(missing_ok=True)


def _read(path: Path) -> Checkpoint:
    with safe_open(path, framework="pt", device="cpu") as handle:
        meta = handle.metadata() or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a traflow checkpoint (format {meta.get('format')!r})")
    return Checkpoint(path=path, step=int(meta["step"]), metadata=meta)


def latest_checkpoint(folder: Path) -> Checkpoint | None:
    """The checkpoint `latest` names, or the newest complete one if the pointer is missing."""
    pointer = folder / "latest"
    if pointer.is_file():
        stem = pointer.read_text().strip()
        path = folder / f"{stem}.safetensors"
        if path.is_file() and (folder / f"{stem}.state.pt").is_file():
            return _read(path)
    complete = sorted(p for p in folder.glob("step-*.safetensors")
                      if p.with_name(p.name.replace(".safetensors", ".state.pt")).is_file())
    return _read(complete[-1]) if complete else None


def run_checkpoint(run_dir: Path) -> Checkpoint:
    """The latest checkpoint of a run folder, or a one-line error."""
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint in {Path(run_dir) / 'checkpoints'}; "
                              "is this a finished or started run folder?")
    return ckpt
