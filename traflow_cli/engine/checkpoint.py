"""Atomic, verified, resumable checkpoints.

A checkpoint is three files in `checkpoints/`: `step-NNNNNNNNN.safetensors` (every module's
weights, prefixed by its name, with the network description in the metadata),
`step-NNNNNNNNN.state.pt` (optimizer state and counters, loadable with weights_only=True) and
`step-NNNNNNNNN.manifest.json` (the sha256 and size of the other two). Each is written under a
temporary name, synced and renamed; the two data files are read back and checked against the
manifest; only then does `latest` move, and only then are older checkpoints pruned. A crash at any
point leaves the previous checkpoint intact, and a damaged file (truncated, flipped bytes) is
caught by its checksum on load: the newest checkpoint that verifies is used instead.

What a checkpoint says about itself is not trusted either (a user's edit or another tool may
have recomputed its manifest): the manifest's sizes must be integers, the network description in
the metadata is bounded JSON (the jobs validate it like a spec before building), and the weights'
names, shapes and dtypes are read from the safetensors header and checked against the network
before any tensor is read. A checkpoint that another live process is still writing (its run
folder's lock held by that process) is "in progress", not damaged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from traflow_cli.engine.records import atomic_write_bytes
from traflow_cli.errors import UserError, one_line
from traflow_cli.untrusted import parse_json

FORMAT = "traflow-checkpoint/1"
MANIFEST_FORMAT = "traflow-checkpoint-manifest/1"
QUARANTINE = "damaged"  # subfolder that damaged checkpoints are moved to on resume
_STEM = re.compile(r"^step-(\d{9,})$")
MAX_NET_CONFIG_CHARS = 1 << 16   # a network description is a few hundred characters
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

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

    def weights(self, prefix: str, expected: Mapping[str, Any] | None = None
                ) -> dict[str, Tensor]:
        """The state dict saved under `prefix` (e.g. "ema"), on the CPU.

        With `expected` (a module's state dict, or names -> shapes), the file's names, shapes
        and dtypes are checked against it from the header first, before any tensor is read: a
        missing, extra or reshaped tensor is one line naming it."""
        if expected is not None:
            self.check_tensors(prefix, expected)
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

    def header(self, prefix: str) -> dict[str, tuple[str, list[int]]]:
        """{name: (dtype, shape)} of the tensors saved under `prefix`, from the safetensors
        header alone (no tensor is read)."""
        out = {}
        try:
            with safe_open(self.path, framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    if key.startswith(prefix + "."):
                        piece = handle.get_slice(key)
                        out[key[len(prefix) + 1:]] = (piece.get_dtype(), list(piece.get_shape()))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{self.path}: unreadable ({one_line(err)})") from None
        return out

    def check_tensors(self, prefix: str, expected: Mapping[str, Any]) -> None:
        """Names, shapes and dtypes of the tensors under `prefix` against `expected` ({name:
        tensor or shape}; a float tensor or a bare shape wants floats); raises CheckpointError
        naming the first difference."""
        found = self.header(prefix)
        shapes = {name: list(getattr(value, "shape", value)) for name, value in expected.items()}
        where = f"{self.path}: tensor '{prefix}."
        hint = ("; the checkpoint was edited or written by another tool: restore it, or "
                "use an earlier checkpoint")
        missing = [name for name in shapes if name not in found]
        if missing:
            raise CheckpointError(f"{where}{missing[0]}' is missing ({len(missing)} missing in "
                                  f"all), though its net_config builds it{hint}")
        extra = [name for name in found if name not in shapes]
        if extra:
            raise CheckpointError(f"{where}{extra[0]}' is not part of the network its net_config "
                                  f"builds ({len(extra)} extra in all){hint}")
        for name, shape in shapes.items():
            dtype, held = found[name]
            if held != shape:
                raise CheckpointError(f"{where}{name}' has shape {held}; the network its "
                                      f"net_config builds needs {shape}{hint}")
            value = expected[name]
            wants_float = value.is_floating_point() if isinstance(value, Tensor) else True
            if wants_float and dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{where}{name}' holds {dtype} values, not floats{hint}")

    def prefixes(self) -> set[str]:
        try:
            with safe_open(self.path, framework="pt", device="cpu") as handle:
                return {key.split(".", 1)[0] for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{self.path}: unreadable ({one_line(err)})") from None

    def trainer_state(self) -> dict[str, Any]:
        """The optimizer state and counters, read as data (no torch.load: a tensor in it is
        exactly the bytes the file holds for it; see interop/tensor_pickle.py)."""
        import zipfile

        from traflow_cli.interop.tensor_pickle import read_torch_zip

        def refuse(module: str, name: str) -> Exception:
            return ValueError(f"it names the global {module}.{name}, which trainer state never "
                              "holds")

        try:
            with zipfile.ZipFile(self.state_path) as archive:
                state = read_torch_zip(archive, self.state_path.stat().st_size,
                                       _state_globals(), refuse)
        except Exception as err:  # zip, pickle and EOF errors of a damaged file alike
            raise CheckpointError(f"{self.state_path}: unreadable ({one_line(err)[:200]})"
                                  ) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.state_path}: unreadable (it holds a "
                                  f"{type(state).__name__}, not a dict of trainer state)")
        return state

    def net_config(self) -> dict[str, Any]:
        """The network description in the metadata: a JSON object naming its `kind`, bounded in
        size and nesting (the jobs validate its fields before building anything)."""
        text = self.metadata.get("net_config")
        if not isinstance(text, str):
            raise CheckpointError(f"{self.path}: its metadata describes no network (no "
                                  "'net_config')")
        if len(text) > MAX_NET_CONFIG_CHARS:
            raise CheckpointError(f"{self.path}: metadata 'net_config' is {len(text)} characters "
                                  f"long, more than any network description "
                                  f"({MAX_NET_CONFIG_CHARS})")
        try:
            config = parse_json(text)
        except ValueError as err:
            raise CheckpointError(f"{self.path}: metadata 'net_config' is not readable JSON "
                                  f"({one_line(err)[:120]})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.path}: metadata 'net_config' is a "
                                  f"{type(config).__name__}, not an object of network settings")
        if not isinstance(config.get("kind"), str):
            raise CheckpointError(f"{self.path}: metadata 'net_config' names no network 'kind' "
                                  "(expected 'mlp', 'ncsnpp' or 'edm')")
        return config


def _state_globals() -> dict[tuple[str, str], Any]:
    """What a trainer state file (torch.save of the optimizer's state dict) names."""
    from collections import OrderedDict

    from traflow_cli.interop.tensor_pickle import STORAGE_TYPES

    return {("collections", "OrderedDict"): OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): "rebuild_tensor",
            ("torch._utils", "_rebuild_parameter"): "rebuild_parameter",
            **{("torch", name): storage for name, storage in STORAGE_TYPES.items()}}


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
        size, digest = entry.get("bytes"), entry.get("sha256")
        # Compared as integers: a size written as a string ("3304648") is a bad manifest, not
        # a file of the wrong size.
        if type(size) is not int or not isinstance(digest, str):
            return (f"{manifest_path.name} lists {path.name} without an integer size and a "
                    "sha256 string")
        if path.stat().st_size != size:
            return f"{path.name} has {path.stat().st_size} bytes, not {size}"
        if sha256_file(path) != digest:
            return f"{path.name} does not match its sha256"
    return None


def _incomplete(folder: Path, stem: str) -> bool:
    """Whether one of the checkpoint's three files has not appeared yet (a write under way,
    or one that a kill cut short)."""
    return not all(path.is_file() for path in _paths(folder, stem))


def _writer(folder: Path) -> int | None:
    """The pid of another live process that holds the run folder (`folder` is its
    checkpoints/): the one that may be writing a checkpoint right now. None if there is none."""
    try:
        pid = int((folder.parent / ".lock").read_bytes()[:32].decode("ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)  # signal 0: is it alive? nothing is sent
    except PermissionError:
        return pid  # alive, another user's
    except (OSError, OverflowError):
        return None
    return pid


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
        raise CheckpointError(f"{path}: not a traflow checkpoint (format "
                              f"{str(meta.get('format'))[:40]!r})")
    step = meta.get("step", "")
    if not (isinstance(step, str) and step.isdigit() and len(step) <= 12):
        raise CheckpointError(f"{path}: metadata 'step' is {step[:40]!r}, not a step number")
    manifest = path.with_name(path.name.replace(".safetensors", ".manifest.json"))
    sha = None
    if manifest.is_file():
        sha = json.loads(manifest.read_text())["files"][path.name]["sha256"]
    return Checkpoint(path=path, step=int(step), metadata=meta, sha256=sha)


def _pointer(folder: Path) -> str | None:
    """The stem `latest` names, if it names one (a damaged pointer names none)."""
    try:
        stem = (folder / "latest").read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return stem if _STEM.match(stem) else None


def latest_checkpoint(folder: Path, *, warn: bool = True) -> Checkpoint | None:
    """The newest checkpoint that verifies; `latest` is a hint, checked after the files on disk.

    Damaged ones are passed over (listed in the result's `skipped`, and logged as one warning
    line each); None when the folder holds no checkpoint at all. When checkpoints exist but none
    verifies, that is a CheckpointError naming what is wrong with the newest. A checkpoint whose
    files are still appearing while another live process holds the run (a run read while it
    trains) is passed over quietly as in progress, never called damaged. `warn=False` skips the
    warning lines (for a second look at a folder whose damage was already reported).
    """
    # Newest first. `latest` is only a hint: a kill between a checkpoint's manifest and the
    # pointer's move leaves a newer complete checkpoint, and one without its manifest is an
    # unfinished write that must be reported, not silently overwritten by the resumed run.
    on_disk = [_stem(s) for s in sorted(_steps(folder), reverse=True)]
    pointed = _pointer(folder)
    stems = on_disk + ([pointed] if pointed and pointed not in on_disk else [])
    skipped: list[str] = []
    in_progress: list[str] = []
    for stem in stems:
        problem = _verify(folder, stem)
        writer = _writer(folder) if problem is not None and _incomplete(folder, stem) else None
        if writer is not None:
            # Another live process holds the run and has not finished this checkpoint's files:
            # it is being written, not damaged; the one before it is the latest so far.
            in_progress.append(f"{folder / stem} is still being written (by the running "
                               f"traflow process {writer})")
            continue
        if problem is None:
            try:
                ckpt = _read(folder / f"{stem}.safetensors")
            except (CheckpointError, SafetensorError, OSError, ValueError, KeyError) as err:
                problem = one_line(err)
            else:
                ckpt.skipped = skipped
                for note in skipped if warn else ():
                    log.warning("%s; using %s instead", note, folder / f"{stem}.safetensors")
                return ckpt
        skipped.append(f"{folder / stem} is damaged: {problem}")
    if skipped:
        raise CheckpointError(f"no usable checkpoint in {folder}: {skipped[0]}"
                              + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    if in_progress:
        raise CheckpointError(f"no finished checkpoint in {folder} yet: {in_progress[0]}; wait "
                              "for it to finish its first checkpoint, then re-run")
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
