"""Atomic, verified, resumable checkpoints.

A checkpoint is three files in `checkpoints/`: `step-NNNNNNNNN.safetensors` (every module's
weights, prefixed by its name, with the network description in the metadata),
`step-NNNNNNNNN.state.pt` (optimizer state and counters, loadable with weights_only=True) and
`step-NNNNNNNNN.manifest.json` (the sha256 and size of the other two). Each is written under a
temporary name, synced and renamed; the two data files are read back and checked against the
manifest; only then does `latest` move, and only then are older checkpoints pruned. A crash at any
point leaves the previous checkpoint intact, and a damaged file (truncated, flipped bytes) is
caught by its checksum on load: the newest checkpoint that verifies is used instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from traflow_cli.engine.records import atomic_write_bytes
from traflow_cli.errors import UserError, one_line

FORMAT = "traflow-checkpoint/1"
MANIFEST_FORMAT = "traflow-checkpoint-manifest/1"
QUARANTINE = "damaged"  # subfolder that damaged checkpoints are moved to on resume
_STEM = re.compile(r"^step-(\d{9,})$")

log = logging.getLogger("traflow")


class CheckpointError(UserError, RuntimeError):
    """A run folder without a usable checkpoint (one line: where and what is missing)."""


def sha256_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MB pieces (~1.2 GB/s here: 0.2 s for a 61.8M-parameter
    network, so every load verifies; no cache keyed on mtime, whose ticks are too coarse to
    notice a rewrite of the same size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    path: Path                       # the .safetensors file
    step: int
    metadata: dict[str, str]
    sha256: str | None = None        # of the .safetensors file, when a manifest recorded it
    skipped: list[str] = field(default_factory=list)  # newer checkpoints that failed to verify

    @property
    def state_path(self) -> Path:
        return self.path.with_name(self.path.name.replace(".safetensors", ".state.pt"))

    def weights(self, prefix: str) -> dict[str, Tensor]:
        """The state dict saved under `prefix` (e.g. "ema"), on the CPU."""
        out = {}
        try:
            with safe_open(self.path, framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    if key.startswith(prefix + "."):
                        out[key[len(prefix) + 1:]] = handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{self.path}: unreadable ({one_line(err)})") from None
        if not out:
            raise CheckpointError(f"{self.path}: no weights saved under {prefix!r}")
        return out

    def prefixes(self) -> set[str]:
        with safe_open(self.path, framework="pt", device="cpu") as handle:
            return {key.split(".", 1)[0] for key in handle.keys()}

    def trainer_state(self) -> dict[str, Any]:
        try:
            return torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as err:  # zip, pickle and EOF errors of a damaged file alike
            raise CheckpointError(f"{self.state_path}: unreadable ({one_line(err)})") from None

    def net_config(self) -> dict[str, Any]:
        try:
            return json.loads(self.metadata["net_config"])
        except (KeyError, ValueError):
            raise CheckpointError(f"{self.path}: its metadata describes no network") from None


def _stem(step: int) -> str:
    return f"step-{step:09d}"


def _paths(folder: Path, stem: str) -> tuple[Path, Path, Path]:
    """(weights, trainer state, manifest) of one checkpoint."""
    return (folder / f"{stem}.safetensors", folder / f"{stem}.state.pt",
            folder / f"{stem}.manifest.json")


def save_checkpoint(folder: Path, *, step: int, modules: dict[str, dict[str, Tensor]],
                    trainer_state: dict[str, Any], metadata: dict[str, str], keep: int = 2) -> Path:
    """Write one checkpoint atomically, verify it on disk, move `latest` to it, then prune to
    the newest `keep` checkpoints at or before `step`."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{key}": value.detach().to("cpu").contiguous()
               for name, state in modules.items() for key, value in state.items()}
    meta = {"format": FORMAT, "step": str(step), **metadata}
    stem = _stem(step)
    weights_path, state_path, manifest_path = _paths(folder, stem)
    payloads = {state_path: _torch_bytes({**trainer_state, "step": step}),
                weights_path: safetensors_bytes(tensors, metadata=meta)}
    manifest = {"format": MANIFEST_FORMAT, "step": step,
                "files": {p.name: {"sha256": sha256_bytes(b), "bytes": len(b)}
                          for p, b in payloads.items()}}
    for path, payload in payloads.items():
        atomic_write_bytes(path, payload)
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
    # Read back what the disk holds before anything older may go (a full disk, a failing
    # device): the previous checkpoint stays the newest good one until this one proves itself.
    problem = _verify(folder, stem)
    if problem is not None:
        raise CheckpointError(f"{weights_path}: failed its check right after writing ({problem}); "
                              "the previous checkpoint is kept; check the disk and re-run")
    atomic_write_bytes(folder / "latest", (stem + "\n").encode())
    _prune(folder, keep, up_to=step)
    return weights_path


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _steps(folder: Path) -> list[int]:
    """Steps of the checkpoints whose weights file exists, newest first."""
    found = []
    for path in folder.glob("step-*.safetensors"):
        match = _STEM.match(path.name.removesuffix(".safetensors"))
        if match:
            found.append(int(match[1]))
    return sorted(found, reverse=True)


def _prune(folder: Path, keep: int, *, up_to: int) -> None:
    """Delete all but the newest `keep` checkpoints at or before step `up_to`."""
    for step in [s for s in _steps(folder) if s <= up_to][keep:]:
        for path in _paths(folder, _stem(step)):
            path.unlink(missing_ok=True)


def _verify(folder: Path, stem: str) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it (one phrase)."""
    weights_path, state_path, manifest_path = _paths(folder, stem)
    for path in (weights_path, state_path):
        if not path.is_file():
            return f"{path.name} is missing"
    if not manifest_path.is_file():
        if any(folder.glob("step-*.manifest.json")):
            # Its siblings have manifests: this one's write was cut short before it got one.
            return f"{manifest_path.name} is missing (its write did not finish)"
        # A run written by traflow 0.1.0, before manifests: check the structure, as far as we can.
        return _check_structure(weights_path)
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest_path.name} is unreadable"
    for path in (weights_path, state_path):
        entry = files.get(path.name) if isinstance(files, dict) else None
        if not isinstance(entry, dict):
            return f"{manifest_path.name} does not list {path.name}"
        if path.stat().st_size != entry.get("bytes"):
            return f"{path.name} has {path.stat().st_size} bytes, not {entry.get('bytes')}"
        if sha256_file(path) != entry.get("sha256"):
            return f"{path.name} does not match its sha256"
    return None


def _check_structure(weights_path: Path) -> str | None:
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        return f"{weights_path.name} is unreadable ({one_line(err)})"
    if meta.get("format") != FORMAT:
        return f"{weights_path.name} is not a traflow checkpoint"
    return None


def _read(path: Path) -> Checkpoint:
    with safe_open(path, framework="pt", device="cpu") as handle:
        meta = handle.metadata() or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a traflow checkpoint (format {meta.get('format')!r})")
    manifest = path.with_name(path.name.replace(".safetensors", ".manifest.json"))
    sha = None
    if manifest.is_file():
        sha = json.loads(manifest.read_text())["files"][path.name]["sha256"]
    return Checkpoint(path=path, step=int(meta["step"]), metadata=meta, sha256=sha)


def _pointer(folder: Path) -> str | None:
    """The stem `latest` names, if it names one (a damaged pointer names none)."""
    try:
        stem = (folder / "latest").read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return stem if _STEM.match(stem) else None


def latest_checkpoint(folder: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; `latest` is a hint, checked after the files on disk.

    Damaged ones are passed over (listed in the result's `skipped`, and logged as one warning
    line each); None when the folder holds no checkpoint at all. When checkpoints exist but none
    verifies, that is a CheckpointError naming what is wrong with the newest.
    """
    # Newest first. `latest` is only a hint: a kill between a checkpoint's manifest and the
    # pointer's move leaves a newer complete checkpoint, and one without its manifest is an
    # unfinished write that must be reported, not silently overwritten by the resumed run.
    on_disk = [_stem(s) for s in sorted(_steps(folder), reverse=True)]
    pointed = _pointer(folder)
    stems = on_disk + ([pointed] if pointed and pointed not in on_disk else [])
    skipped: list[str] = []
    for stem in stems:
        problem = _verify(folder, stem)
        if problem is None:
            try:
                ckpt = _read(folder / f"{stem}.safetensors")
            except (CheckpointError, SafetensorError, OSError, ValueError, KeyError) as err:
                problem = one_line(err)
            else:
                ckpt.skipped = skipped
                for note in skipped:
                    log.warning("%s; using %s instead", note, folder / f"{stem}.safetensors")
                return ckpt
        skipped.append(f"{folder / stem} is damaged: {problem}")
    if skipped:
        raise CheckpointError(f"no usable checkpoint in {folder}: {skipped[0]}"
                              + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    return None


def quarantine_newer(folder: Path, step: int) -> list[Path]:
    """Move checkpoints newer than `step` (damaged ones a resume passed over) into
    `checkpoints/damaged/`, so the resumed run neither prunes by them nor trips over them."""
    moved = []
    for newer in [s for s in _steps(folder) if s > step]:
        (folder / QUARANTINE).mkdir(exist_ok=True)
        for path in _paths(folder, _stem(newer)):
            if path.is_file():
                path.replace(folder / QUARANTINE / path.name)
                moved.append(folder / QUARANTINE / path.name)
    return moved


def run_checkpoint(run_dir: Path) -> Checkpoint:
    """The latest checkpoint of a run folder, or a one-line error."""
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint in {Path(run_dir) / 'checkpoints'}; "
                              "is this a finished or started run folder?")
    return ckpt
