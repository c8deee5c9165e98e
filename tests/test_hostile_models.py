"""Untrusted model files and tampered checkpoints (issue 18, causes 2, 3, 4 and 8): each hostile
file is built here the way the probe built it, and each must end with exit code 2 and one
`error:` line naming the file or field, no traceback, bounded memory, and no byte that was not
in the file in any tensor."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import EDM_FIXTURES, FIXTURES, invoke
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from traflow_cli.engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    run_checkpoint,
    save_checkpoint,
)
from traflow_cli.interop import CheckpointFormatError, load_network_pickle, read_edm_snapshot
from traflow_cli.interop.edm import _network_config
from traflow_cli.interop.edm_pickle import ModuleState, PersistentObject, _SnapshotUnpickler
from traflow_cli.interop.rectified_flow import read_rectified_flow_checkpoint
from traflow_cli.interop.tensor_pickle import BadContent, BoundedReader, TensorPickleReader
from traflow_cli.jobs.common import net_metadata
from traflow_cli.models import load_student, load_teacher
from traflow_cli.nets import build_net
from traflow_cli.nets.edm import EDMNet
from traflow_cli.nets.ncsnpp import NCSNpp

EDM_SMALL = EDM_FIXTURES / "edm_ddpmpp_small.pkl"
RF_SMALL = FIXTURES / "rf_ncsnpp_small.pth"   # NCSNpp nf=16, ch_mult (1, 2, 2), 32 px
# A traflow process that imports torch and fails on a small file peaks at ~650 MB here; each
# bomb below would take 3.5 GB or more, so this bound tells the two apart with room to spare.
MAX_RSS_MB = 1500


# ---- running the CLI ----------------------------------------------------------------------

_MEASURE = ("import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[2:])\n"
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN)"
            ".ru_maxrss))\n"
            "sys.exit(r.returncode)\n")


def run_measured(tmp_path: Path, *args: Any, timeout: float = 300) -> tuple[int, str, float]:
    """`traflow ARGS` in a child process: (exit code, stderr, its peak resident memory in MB)."""
    rss = tmp_path / f"rss-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(rss), sys.executable, "-m",
                             "traflow_cli", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=timeout)
    return result.returncode, result.stderr, int(rss.read_text()) / 1024


def one_error_line(code: int, stderr: str, *words: str) -> str:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ---- writing EDM snapshots ----------------------------------------------------------------

def _reconstruct_persistent_obj(meta: Any) -> Any:
    raise AssertionError("only ever pickled by reference, never called")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
_CONTAINERS = {"ModuleDict": torch.nn.ModuleDict, "ModuleList": torch.nn.ModuleList,
               "Sequential": torch.nn.Sequential}


class Grow:
    """Pickles as EDM pickles a tensor, a one-element view of a one-element storage, followed by
    a BUILD whose state (storage, offset, size, stride) would `set_` it to `shape`: the storage
    grows past the bytes in the file (uninitialised heap memory as weights)."""

    def __init__(self, shape: torch.Size) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.storage = torch.zeros(1).storage()
        self.shape = tuple(shape)
        strides, step = [], 1
        for n in reversed(self.shape):
            strides.insert(0, step)
            step *= n
        self.stride = tuple(strides)

    def __reduce_ex__(self, protocol: int) -> Any:
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, (1,), (1,), False, OrderedDict()),
                (self.storage, 0, self.shape, self.stride))


class SnapshotPickler(pickle.Pickler):
    """Writes what load_network_pickle read back in EDM's own format (persistence records,
    torch.nn containers, tensors with their storages as legacy torch.save blobs)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, PersistentObject):
            meta = {"type": "class", "version": 4, "module_src": "", "class_name": obj.class_name,
                    "state": obj.state}
            return _reconstruct_persistent_obj, (meta,)
        if isinstance(obj, ModuleState):
            return _CONTAINERS[obj.container], (), obj.state
        if isinstance(obj, Grow):
            return obj.__reduce_ex__(4)
        return NotImplemented


def write_snapshot(snapshot: Any, path: Path) -> Path:
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    saved = {name: sys.modules.get(name) for name in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": module})
    try:
        with path.open("wb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            SnapshotPickler(handle, protocol=4).dump(snapshot)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    return path


def replace_weights(record: PersistentObject | ModuleState, new: Callable[[str, torch.Tensor], Any],
                    prefix: str = "") -> None:
    """Replace every parameter and buffer of a pickled module tree by new(name, tensor)."""
    state = record.state
    for group in ("_parameters", "_buffers"):
        for name, value in list((state.get(group) or {}).items()):
            if isinstance(value, torch.Tensor):
                state[group][name] = new(prefix + name, value)
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            replace_weights(child, new, f"{prefix}{name}.")


def edm_snapshot() -> dict[str, Any]:
    return load_network_pickle(EDM_SMALL)


def unet(snapshot: dict[str, Any]) -> PersistentObject:
    return snapshot["ema"].state["_modules"]["model"]


def test_a_rewritten_snapshot_reads_back_the_same(tmp_path: Path) -> None:
    # The writer above is faithful: what the hostile cases change is all that differs.
    copy = write_snapshot(edm_snapshot(), tmp_path / "copy.pkl")
    original, again = read_edm_snapshot(EDM_SMALL), read_edm_snapshot(copy)
    assert again.config == original.config
    assert all(torch.equal(again.weights[k], original.weights[k]) for k in original.weights)


# ---- cause 2: BUILD on a tensor -----------------------------------------------------------

def test_build_on_a_tensor_is_refused_before_it_can_grow_the_storage(tmp_path: Path) -> None:
    bare = tmp_path / "grow.pkl"
    write_snapshot({"w": Grow(torch.Size([1000, 1000]))}, bare)
    with pytest.raises(CheckpointFormatError, match="BUILD") as info:
        load_network_pickle(bare)
    assert str(bare) in str(info.value) and "\n" not in str(info.value)

    # In a whole snapshot whose settings fit the grown shape, the import would otherwise exit 0
    # with a million uninitialised floats as one of its weights.
    snapshot = edm_snapshot()
    first = True

    def grow_one(name: str, value: torch.Tensor) -> Any:
        nonlocal first
        if first and value.dim() == 4:
            first = False
            return Grow(value.shape)
        return value

    replace_weights(snapshot["ema"], grow_one)
    path = write_snapshot(snapshot, tmp_path / "grow-snapshot.pkl")
    result = invoke("teacher", "import", "edm", path, "--out", tmp_path / "out")
    one_error_line(result.exit_code, result.stderr, str(path), "BUILD")
    assert not (tmp_path / "out").exists()


def test_tensors_are_checked_again_after_unpickling() -> None:
    blob = pickle.dumps(torch.arange(4.0))  # torch's own format: a legacy blob per storage
    reader = _SnapshotUnpickler(BoundedReader(io.BytesIO(blob), len(blob)), Path("x.pkl"),
                                len(blob))
    tensor = reader.load()
    assert isinstance(reader, TensorPickleReader) and torch.equal(tensor, torch.arange(4.0))
    reader.verify()
    tensor.set_(tensor.untyped_storage(), 0, (64,), (1,))  # grows the storage, as BUILD would
    with pytest.raises(BadContent, match="changed after it was read"):
        reader.verify()


# ---- cause 3: small files that expand -----------------------------------------------------

def _bigger_edm(snapshot: dict[str, Any], channels: int) -> dict[str, torch.Size]:
    """Make the snapshot's U-Net `channels` wide; the shapes its weights must then have."""
    kwargs = unet(snapshot).state["_init_kwargs"]
    kwargs["model_channels"] = channels
    config = read_config(snapshot)
    with torch.device("meta"):
        net = EDMNet(**{k: v for k, v in config.items() if k != "kind"})
    return {name: value.shape for name, value in net.state_dict().items()}


def read_config(snapshot: dict[str, Any]) -> dict[str, Any]:
    return _network_config(snapshot["ema"], Path("snapshot.pkl"))[0]


def test_an_edm_pickle_of_stride_0_views_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    snapshot = edm_snapshot()
    shapes = _bigger_edm(snapshot, 1024)  # ~800M values: 3.3 GB once materialised
    replace_weights(snapshot["ema"], lambda name, value: torch.zeros(1).expand(shapes[name]))
    path = write_snapshot(snapshot, tmp_path / "stride0.pkl")
    assert path.stat().st_size < 100_000
    code, stderr, rss = run_measured(tmp_path, "teacher", "import", "edm", path,
                                     "--out", tmp_path / "out")
    one_error_line(code, stderr, str(path), "stride 0")
    assert rss < MAX_RSS_MB, rss


def test_an_edm_pickle_sharing_one_tensor_among_many_names_is_refused(tmp_path: Path) -> None:
    snapshot = edm_snapshot()
    shapes = _bigger_edm(snapshot, 512)
    one_per_shape: dict[torch.Size, torch.Tensor] = {}

    def shared(name: str, value: torch.Tensor) -> torch.Tensor:
        return one_per_shape.setdefault(shapes[name], torch.zeros(shapes[name]))

    replace_weights(snapshot["ema"], shared)
    path = write_snapshot(snapshot, tmp_path / "shared.pkl")
    with pytest.raises(CheckpointFormatError) as info:
        read_edm_snapshot(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_shared_list_channel_mult_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    snapshot = edm_snapshot()
    nested: list[Any] = [1, 2]
    for _ in range(40):  # 2**40 leaves, a few hundred bytes in the pickle
        nested = [nested, nested]
    unet(snapshot).state["_init_kwargs"]["channel_mult"] = nested
    path = write_snapshot(snapshot, tmp_path / "laughs.pkl")
    code, stderr, rss = run_measured(tmp_path, "teacher", "import", "edm", path,
                                     "--out", tmp_path / "out", timeout=120)
    one_error_line(code, stderr, str(path))
    assert rss < MAX_RSS_MB, rss


@pytest.mark.parametrize(("setting", "value", "word"), [
    ("num_blocks", 10**7, "num_blocks"),
    ("channel_mult", [1] * 5000, "channel_mult"),
    ("model_channels", 10**9, "model_channels"),
    ("attn_resolutions", list(range(1, 3000)), "attn_resolutions"),
    ("dropout", [0.1] * 10, "dropout"),
    ("resample_filter", "x" * 10**6, "resample_filter"),
])
def test_fuzzed_network_settings_are_refused_before_building(tmp_path: Path, setting: str,
                                                              value: Any, word: str) -> None:
    snapshot = edm_snapshot()
    unet(snapshot).state["_init_kwargs"][setting] = value
    path = write_snapshot(snapshot, tmp_path / "fuzzed.pkl")
    began = time.perf_counter()
    result = invoke("teacher", "import", "edm", path, "--out", tmp_path / "out")
    one_error_line(result.exit_code, result.stderr, str(path), word)
    assert time.perf_counter() - began < 30
    assert len(result.stderr) < 600  # the value is described, never printed whole


def _official_like(config: dict[str, Any], tensor: Callable[[str, torch.Size], Any]
                   ) -> dict[str, Any]:
    """An official Rectified Flow checkpoint's layout around NCSNpp(**config)'s names."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in NCSNpp(**config).state_dict().items()}
    model = OrderedDict(("module." + name, tensor(name, shape)) for name, shape in shapes.items())
    model["module.sigmas"] = torch.linspace(0.01, 50, 10)
    return {"model": model, "ema": {"decay": 0.999, "num_updates": 1,
                                    "shadow_params": [tensor(n, s) for n, s in shapes.items()]},
            "step": 1}


RF_CONFIG = {"image_size": 32, "in_channels": 3, "nf": 16, "ch_mult": (1, 2, 2),
             "num_res_blocks": 2, "attn_resolutions": (16,), "dropout": 0.1}


def test_an_rf_checkpoint_of_stride_0_views_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    big = {**RF_CONFIG, "nf": 1024}  # ~1.3G values: 5 GB once built
    path = tmp_path / "stride0.pth"
    torch.save(_official_like(big, lambda name, shape: torch.zeros(1).expand(shape)), path)
    assert path.stat().st_size < 500_000
    code, stderr, rss = run_measured(tmp_path, "teacher", "import", "rectified-flow", path,
                                     "--out", tmp_path / "out")
    one_error_line(code, stderr, str(path), "stride 0")
    assert rss < MAX_RSS_MB, rss


def test_an_rf_checkpoint_sharing_tensors_among_names_is_refused(tmp_path: Path) -> None:
    one_per_shape: dict[torch.Size, torch.Tensor] = {}
    path = tmp_path / "shared.pth"
    torch.save(_official_like({**RF_CONFIG, "nf": 64, "num_res_blocks": 8},
                              lambda name, shape: one_per_shape.setdefault(
                                  shape, torch.zeros(shape))), path)
    with pytest.raises(CheckpointFormatError, match="more than the file") as info:
        read_rectified_flow_checkpoint(path)
    assert str(path) in str(info.value)


class GrowingTensor:
    """In a torch.save file: a one-element tensor, then a BUILD that would set_ it to `shape`."""

    def __init__(self, shape: torch.Size) -> None:
        self.grow = Grow(shape)

    def __reduce_ex__(self, protocol: int) -> Any:
        return self.grow.__reduce_ex__(protocol)


def test_build_on_a_tensor_in_an_rf_checkpoint_is_refused(tmp_path: Path) -> None:
    grown = {"all_modules.3.Conv_0.weight"}
    ckpt = _official_like(RF_CONFIG, lambda name, shape: GrowingTensor(shape) if name in grown
                          else torch.zeros(shape))
    path = tmp_path / "grow.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(ckpt, path)
    result = invoke("teacher", "import", "rectified-flow", path, "--out", tmp_path / "out")
    one_error_line(result.exit_code, result.stderr, str(path), "BUILD")
    assert not (tmp_path / "out").exists()


def test_a_zip_member_claiming_more_than_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", pickle.dumps({"model": {}}, protocol=2))
        archive.writestr("bomb/data/0", b"\0" * (8 << 20))  # 8 MB from a few KB
    with pytest.raises(CheckpointFormatError, match="zip bomb"):
        read_rectified_flow_checkpoint(path)


# ---- cause 8: non-finite weights on import --------------------------------------------------

def test_imports_refuse_nan_or_infinite_weights(tmp_path: Path) -> None:
    ckpt = torch.load(RF_SMALL, map_location="cpu", weights_only=True)
    ckpt["ema"]["shadow_params"][5] = ckpt["ema"]["shadow_params"][5].clone().fill_(float("nan"))
    rf = tmp_path / "nan.pth"
    torch.save(ckpt, rf)
    result = invoke("teacher", "import", "rectified-flow", rf, "--out", tmp_path / "rf-out")
    one_error_line(result.exit_code, result.stderr, str(rf), "NaN")

    snapshot = edm_snapshot()
    replace_weights(snapshot["ema"], lambda name, value: value.clone().fill_(float("inf"))
                    if value.dim() == 1 else value)
    edm = write_snapshot(snapshot, tmp_path / "inf.pkl")
    result = invoke("teacher", "import", "edm", edm, "--out", tmp_path / "edm-out")
    one_error_line(result.exit_code, result.stderr, str(edm), "NaN or infinite")
    assert not (tmp_path / "rf-out").exists() and not (tmp_path / "edm-out").exists()


# ---- cause 4: tampered checkpoint metadata ------------------------------------------------

@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy2d teacher after 2 steps of training: the real files every tamper starts from."""
    run = tmp_path_factory.mktemp("hostile") / "teacher"
    result = invoke("teacher", "train", "--out", run, "--steps", "2", "--device", "cpu",
                    "--set", "net.hidden=16", "--set", "teacher.batch_size=8",
                    "--set", "teacher.log_every_steps=1", "--set", "teacher.checkpoint_every_steps=2")
    assert result.exit_code == 0, result.output
    return run


def rewrite(run: Path, *, meta: Callable[[dict[str, str]], None] | None = None,
            tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
            manifest: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Edit the latest checkpoint's metadata or tensors, then recompute its manifest as
    save_checkpoint does (sha256 and size of each file), as a user's edit or another tool would."""
    folder = run / "checkpoints"
    stem = (folder / "latest").read_text().strip()
    weights = folder / f"{stem}.safetensors"
    with safe_open(weights, framework="pt") as handle:
        metadata = dict(handle.metadata())
        found = {key: handle.get_tensor(key) for key in handle.keys()}
    if meta:
        meta(metadata)
    if tensors:
        tensors(found)
    weights.write_bytes(safetensors_bytes(found, metadata=metadata))
    manifest_path = folder / f"{stem}.manifest.json"
    record = json.loads(manifest_path.read_text())
    for name in record["files"]:
        data = (folder / name).read_bytes()
        record["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if manifest:
        manifest(record)
    manifest_path.write_text(json.dumps(record, indent=1) + "\n")
    return weights


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def net_config_edit(edit: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, str]], None]:
    def apply(meta: dict[str, str]) -> None:
        config = json.loads(meta["net_config"])
        meta["net_config"] = json.dumps(edit(config))
    return apply


def test_a_huge_net_config_is_refused_before_allocating(toy_run: Path, tmp_path: Path) -> None:
    run = copy_run(toy_run, tmp_path)
    weights = rewrite(run, meta=net_config_edit(lambda c: {**c, "hidden": 16000}))
    code, stderr, rss = run_measured(tmp_path, "sample", run, "--out", tmp_path / "samples",
                                     "-n", "2", "--device", "cpu")
    one_error_line(code, stderr, str(weights), "shape")
    assert rss < MAX_RSS_MB, rss


@pytest.mark.parametrize(("case", "edit", "words"), [
    ("missing kind", {"meta": net_config_edit(lambda c: {k: v for k, v in c.items()
                                                         if k != "kind"})}, ["'kind'"]),
    ("extra key", {"meta": net_config_edit(lambda c: {**c, "flavour": 3})},
     ["net_config.flavour"]),
    ("a list", {"meta": net_config_edit(lambda c: [c])}, ["net_config", "list"]),
    ("a string for a number", {"meta": net_config_edit(lambda c: {**c, "hidden": "16"})},
     ["net_config.hidden"]),
    ("unknown kind", {"meta": net_config_edit(lambda c: {**c, "kind": "transformer"})},
     ["net_config"]),
    ("not JSON", {"meta": lambda m: m.update(net_config="{hidden: 16")}, ["net_config", "JSON"]),
    ("deeply nested", {"meta": lambda m: m.update(net_config="[" * 5000 + "]" * 5000)},
     ["net_config"]),
    ("no net_config", {"meta": lambda m: m.pop("net_config")}, ["net_config"]),
    ("wrong shape", {"tensors": lambda t: t.update({"ema.t_embed.1.weight": torch.zeros(3, 64)})},
     ["ema.t_embed.1.weight", "shape"]),
    ("extra tensor", {"tensors": lambda t: t.update({"ema.extra.weight": torch.zeros(2)})},
     ["ema.extra.weight"]),
    ("missing tensor", {"tensors": lambda t: t.pop("ema.t_embed.1.weight")},
     ["ema.t_embed.1.weight", "missing"]),
    ("integer weights", {"tensors": lambda t: t.update(
        {"ema.t_embed.1.bias": torch.zeros(16, dtype=torch.int64)})}, ["ema.t_embed.1.bias"]),
    ("native_grid bogus", {"meta": lambda m: m.update(native_grid="bogus")}, ["native_grid"]),
    ("nan weights", {"tensors": lambda t: t["ema.t_embed.1.weight"].fill_(float("nan"))},
     ["not finite", "teacher"]),
    ("step not a number", {"meta": lambda m: m.update(step="two")}, ["step"]),
])
def test_tampered_teacher_metadata_is_one_line_naming_the_field(
        toy_run: Path, tmp_path: Path, case: str, edit: dict[str, Any], words: list[str]) -> None:
    run = copy_run(toy_run, tmp_path)
    weights = rewrite(run, **edit)
    with pytest.raises(CheckpointError) as info:
        load_teacher(run)
    message = str(info.value)
    assert "\n" not in message and str(weights) in message, (case, message)
    for word in words:
        assert word in message, (case, message)


@pytest.mark.parametrize("case", ["extra key", "wrong shape"])
def test_sample_and_resume_on_a_tampered_checkpoint_exit_2(toy_run: Path, tmp_path: Path,
                                                            case: str) -> None:
    run = copy_run(toy_run, tmp_path)
    if case == "extra key":
        rewrite(run, meta=net_config_edit(lambda c: {**c, "flavour": 3}))
    else:
        rewrite(run, tensors=lambda t: t.update({"ema.t_embed.1.weight": torch.zeros(3, 64)}))
    result = invoke("sample", run, "--out", tmp_path / "samples", "-n", "2", "--device", "cpu")
    one_error_line(result.exit_code, result.stderr, "flavour" if case == "extra key" else "shape")
    if case == "wrong shape":  # a resume checks the shapes against the network it trains
        result = invoke("teacher", "train", "--out", run, "--steps", "4", "--device", "cpu",
                        "--set", "net.hidden=16", "--set", "teacher.batch_size=8",
                        "--set", "teacher.log_every_steps=1",
                        "--set", "teacher.checkpoint_every_steps=2")
        one_error_line(result.exit_code, result.stderr, "ema.t_embed.1.weight")


def test_nan_teacher_is_named_by_distill_not_blamed_on_the_learning_rate(
        toy_run: Path, tmp_path: Path) -> None:
    run = copy_run(toy_run, tmp_path)
    rewrite(run, tensors=lambda t: [v.fill_(float("nan")) for k, v in t.items()
                                    if k.startswith("ema.")])
    result = invoke("distill", "--teacher", run, "--out", tmp_path / "student", "--steps", "2",
                    "--device", "cpu", "--set", "distill.batch_size=8")
    line = one_error_line(result.exit_code, result.stderr, "teacher", "not finite")
    assert "distill.lr" not in line


def test_a_manifest_size_written_as_a_string_is_named_as_such(toy_run: Path,
                                                              tmp_path: Path) -> None:
    run = copy_run(toy_run, tmp_path)

    def as_strings(record: dict[str, Any]) -> None:
        for entry in record["files"].values():
            entry["bytes"] = str(entry["bytes"])

    rewrite(run, manifest=as_strings)
    with pytest.raises(CheckpointError) as info:
        run_checkpoint(run)
    message = str(info.value)
    assert "integer size" in message and "bytes, not" not in message, message


def _student_run(toy_run: Path, tmp_path: Path) -> Path:
    """A student checkpoint written as distill writes one (weights under `ema`, the grid it was
    distilled on in the metadata), on the toy teacher's network."""
    config = json.loads(run_checkpoint(toy_run).metadata["net_config"])
    student = build_net(config, target_time=True)
    run = tmp_path / "student"
    save_checkpoint(run / "checkpoints", step=1, modules={"ema": student.state_dict()},
                    trainer_state={}, metadata=net_metadata(config, "student",
                                                           teacher=str(toy_run),
                                                           time_grid="uniform", grid_steps=18))
    return run


@pytest.mark.parametrize(("key", "value"), [("grid_steps", "abc"), ("grid_steps", "0"),
                                            ("grid_steps", "99999999999"),
                                            ("time_grid", "bogus")])
def test_tampered_student_grid_metadata_is_one_line(toy_run: Path, tmp_path: Path, key: str,
                                                    value: str) -> None:
    run = _student_run(toy_run, tmp_path)
    assert load_student(run).grid_steps == 18
    rewrite(run, meta=lambda m: m.update({key: value}))
    with pytest.raises(CheckpointError) as info:
        load_student(run)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_a_checkpoint_being_written_by_a_live_run_is_in_progress_not_damaged(
        toy_run: Path, tmp_path: Path) -> None:
    run = copy_run(toy_run, tmp_path)
    folder = run / "checkpoints"
    newest = run_checkpoint(run)
    # The trainer has renamed the next checkpoint's weights into place, not yet its trainer
    # state or manifest, and holds the run folder.
    shutil.copy(newest.path, folder / "step-000000004.safetensors")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(str(writer.pid))
        ckpt = latest_checkpoint(folder)
        assert ckpt is not None and ckpt.step == newest.step and ckpt.skipped == []
        assert load_teacher(run) is not None
    finally:
        writer.kill()
        writer.wait()
    # Once that process is gone, the same half-written checkpoint is what a kill left: damaged.
    ckpt = latest_checkpoint(folder)
    assert ckpt is not None and ckpt.step == newest.step
    assert len(ckpt.skipped) == 1 and "damaged" in ckpt.skipped[0]


def test_the_first_checkpoint_of_a_live_run_is_reported_as_not_finished_yet(
        toy_run: Path, tmp_path: Path) -> None:
    run = copy_run(toy_run, tmp_path)
    for path in (run / "checkpoints").iterdir():
        if not path.name.endswith(".safetensors"):
            path.unlink()
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(str(writer.pid))
        with pytest.raises(CheckpointError, match="still being written") as info:
            run_checkpoint(run)
        assert "damaged" not in str(info.value)
    finally:
        writer.kill()
        writer.wait()


# ---- cause 8: Ctrl-C while the interpreter shuts down ---------------------------------------

@pytest.mark.parametrize("code", [0, 2])
def test_ctrl_c_during_shutdown_keeps_the_exit_code_and_prints_no_traceback(code: int) -> None:
    # The command has finished (its exit code decided) when the Ctrl-C lands in an atexit hook.
    script = (
        "import atexit, os, signal, time\n"
        "import traflow_cli.cli.app as cli\n"
        f"def app():\n    raise SystemExit({code})\n"
        "cli.app = app\n"
        "def late_ctrl_c():\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)\n"
        "atexit.register(late_ctrl_c)\n"
        "cli.main()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    assert result.stderr == ""
