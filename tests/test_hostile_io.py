"""Hostile resources and untrusted files (issue 18): full disks, read-only folders, bombs.

Each fault is injected as the probe did: short writes and ENOSPC through a patched `os.write`,
EROFS through a patched `os.mkdir`/`os.open`, zip, dataset.json and npz bombs built here (small
on disk), links to /dev/zero, pipes and loops, a reference folder changed behind its cache,
sizes past any machine. Each must end with exit code 2 and one `error:` line naming the file or
field, no traceback, and nothing partial trusted by the next run.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import OFFICIAL_FIXTURES, TINY_TOY, invoke
from torch import nn

from traflow_cli import load_teacher
from traflow_cli.data.images import DatasetError, open_image_dataset
from traflow_cli.engine import records
from traflow_cli.jobs.writers import png_is_complete
from traflow_cli.metrics import fid as fid_mod
from traflow_cli.metrics.inception import InceptionInfo
from traflow_cli.specs import MAX_SAMPLES
from traflow_cli.untrusted import load_npz

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")

PRESET = """preset = "tiny16"
[data]
name = "cifar10"
resolution = 16
[net]
kind = "ncsnpp"
[sample]
num_samples = 8
batch_size = 4
solver = "euler"
steps = 2
"""
PROC_FD = Path("/proc/self/fd")
needs_proc = pytest.mark.skipif(not PROC_FD.is_dir(), reason="names fds through /proc/self/fd")


def error_line(result, *mentions: str) -> str:
    """The one `error:` line of a failed command (exit 2, no traceback), checked to mention
    each of `mentions`. Whole progress lines may precede it on stderr."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    for mention in mentions:
        assert mention in errors[0], errors[0]
    return errors[0]


def fd_path(fd: int) -> str:
    try:
        return os.readlink(PROC_FD / str(fd))
    except OSError:
        return ""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16x16 image teacher (the official Rectified Flow fixture), sampled in 2 Euler steps."""
    base = tmp_path_factory.mktemp("hostile")
    preset = base / "tiny16.toml"
    preset.write_text(PRESET)
    run = base / "t16"
    result = invoke("teacher", "import", "rectified-flow", OFFICIAL_FIXTURES["official-nf12"][0],
                    "--image-size", "16", "--preset", preset, "--out", run)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def whole(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The PNG bytes of one uninterrupted run of 8 samples."""
    out = tmp_path_factory.mktemp("whole") / "s"
    result = invoke("sample", teacher, "--out", out, "-n", "8", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return png_bytes(out)


def png_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


# ---- cause 1: full disk, short writes ----------------------------------------------------------


def test_short_writes_are_completed(teacher: Path, whole: dict[str, bytes], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:37])))
    result = invoke("sample", teacher, "--out", tmp_path / "s", "-n", "8", "--device", "cpu")
    monkeypatch.undo()
    assert result.exit_code == 0, result.output
    assert png_bytes(tmp_path / "s") == whole


@needs_proc
def test_a_full_disk_while_sampling_is_one_line_and_the_rerun_remakes_the_rest(
        teacher: Path, whole: dict[str, bytes], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "s"
    real_write = os.write
    pngs = {"started": 0}

    def disk_fills(fd: int, data: bytes) -> int:
        if fd_path(fd).endswith(".png.tmp"):
            if len(data) > 120:  # the start of a PNG
                pngs["started"] += 1
            if pngs["started"] > 3:  # the fourth PNG finds the disk full after 100 bytes
                if len(data) > 120:
                    return real_write(fd, bytes(data[:100]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", disk_fills)
    result = invoke("sample", teacher, "--out", out, "-n", "8", "--batch-size", "2",
                    "--device", "cpu")
    monkeypatch.undo()
    error_line(result, "no space left", "free space on", str(out / "images"))
    kept = list((out / "images").iterdir())
    assert kept and len(kept) < 8
    assert all(p.suffix == ".png" and png_is_complete(p) for p in kept), kept  # no .tmp, no cut
    again = invoke("sample", teacher, "--out", out, "-n", "8", "--device", "cpu", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["made_now"] == 8 - len(kept)
    assert png_bytes(out) == whole


def test_a_cut_png_from_an_older_writer_is_made_again(teacher: Path, whole: dict[str, bytes],
                                                      tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert invoke("sample", teacher, "--out", out, "-n", "8", "--device", "cpu").exit_code == 0
    cut = out / "images" / "000003.png"
    cut.write_bytes(cut.read_bytes()[:60])  # what the old writer renamed into place
    (out / "images" / "000005.png").write_bytes(b"")
    again = invoke("sample", teacher, "--out", out, "-n", "8", "--device", "cpu", "--json",
                   "--format", "both")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["made_now"] == 2
    assert "2 sample PNGs" in again.stderr and "incomplete" in again.stderr
    assert png_bytes(out) == whole
    with np.load(out / "samples.npz") as archive:
        assert archive["images"].shape == (8, 16, 16, 3)


@needs_proc
@pytest.mark.parametrize("errno_code", [errno.ENOSPC, errno.EROFS])
def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one(
        errno_code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "teacher"
    args = ["teacher", "train", "--out", run, "--steps", "4", "--device", "cpu", *TINY_TOY,
            "--set", "teacher.checkpoint_every_steps=2", "--set", "teacher.log_every_steps=1"]
    real = records.write_fully

    def fails_at_step_4(fd: int, payload: bytes) -> None:
        if "step-000000004" in fd_path(fd):
            raise OSError(errno_code, os.strerror(errno_code))
        real(fd, payload)

    monkeypatch.setattr(records, "write_fully", fails_at_step_4)
    result = invoke(*args)
    monkeypatch.undo()
    error_line(result, "step-000000004", "cannot write")
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000000002"
    assert not [p for p in checkpoints.iterdir() if ".tmp" in p.name]
    load_teacher(run)  # the last good checkpoint loads
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert (checkpoints / "latest").read_text().strip() == "step-000000004"


@needs_proc
def test_a_full_disk_at_spec_json_leaves_no_folder(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "teacher"
    real = records.write_fully

    def fails_on_record(fd: int, payload: bytes) -> None:
        if ".spec.json.tmp" in fd_path(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, payload)

    monkeypatch.setattr(records, "write_fully", fails_on_record)
    result = invoke("teacher", "train", "--out", run, "--steps", "2", "--device", "cpu", *TINY_TOY)
    error_line(result, "spec.json", "free space on")
    assert not run.exists()


@needs_proc
def test_a_full_disk_at_the_trajectory_cache_is_one_line(toy_teacher: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = records.write_fully

    def fails_on_cache(fd: int, payload: bytes) -> None:
        if "teacher_trajectories" in fd_path(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, payload)

    monkeypatch.setattr(records, "write_fully", fails_on_cache)
    out = tmp_path / "student"
    result = invoke("distill", "--teacher", toy_teacher, "--out", out, "--steps", "2",
                    "--device", "cpu", "--set", "distill.batch_size=32",
                    "--set", "distill.trajectory_cache=64")
    error_line(result, "teacher_trajectories", "free space on")
    assert not list(out.glob(".*tmp*"))


def test_a_read_only_out_leaves_no_lock_only_folder(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_mkdir, real_open = os.mkdir, os.open

    def read_only_mkdir(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    out = tmp_path / "ro" / "run"
    result = invoke("teacher", "train", "--out", out, "--steps", "2", "--device", "cpu", *TINY_TOY)
    error_line(result, "read-only", str(out))
    assert not out.exists()
    monkeypatch.undo()

    # An empty folder on a file system that turned read-only: the lock cannot be made.
    out = tmp_path / "mounted"
    out.mkdir()

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    result = invoke("teacher", "train", "--out", out, "--steps", "2", "--device", "cpu", *TINY_TOY)
    monkeypatch.undo()
    error_line(result, "read-only")
    assert list(out.iterdir()) == []


# ---- cause 3 (data): bombs, special files, links -----------------------------------------------


def png(seed: int = 0, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def train_on(path: Path, tmp_path: Path, *sets: str):
    return invoke("teacher", "train", "--preset", "shapes32", "--out", tmp_path / "run",
                  "--steps", "1", "--set", "data.name=folder", "--set", f"data.path={path}",
                  "--set", "data.resolution=8", "--set", "net.image_size=8", *sets)


def test_a_zip_bomb_dataset_is_refused_before_inflating(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", png(0))
        with zf.open("b.png", "w", force_zip64=True) as member:
            member.write(png(1))  # a valid header: only its size gives it away
            zeros = bytes(1 << 20)
            for _ in range(260):
                member.write(zeros)
    assert bomb.stat().st_size < 1 << 20
    error_line(train_on(bomb, tmp_path), "b.png", "inflates to", str(bomb))
    assert not (tmp_path / "run").exists()


def test_a_zip_member_lying_about_its_ratio_is_refused(tmp_path: Path) -> None:
    lie = tmp_path / "lie.zip"
    with zipfile.ZipFile(lie, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", png(0))
        zf.writestr("b.png", png(1))
    raw = bytearray(lie.read_bytes())
    # b.png's central directory entry: its uncompressed size (bytes 24..28) now claims 10 MB
    # from a few hundred compressed bytes.
    entry = raw.index(b"PK\x01\x02")
    while raw[entry + 46:entry + 51] != b"b.png":
        entry = raw.index(b"PK\x01\x02", entry + 4)
    raw[entry + 24:entry + 28] = (10 << 20).to_bytes(4, "little")
    lie.write_bytes(bytes(raw))
    with zipfile.ZipFile(lie) as zf:
        info = zf.getinfo("b.png")
    assert info.file_size == 10 << 20 and info.compress_size < 1000
    error_line(train_on(lie, tmp_path), "b.png", "more than compression allows")


@pytest.mark.parametrize("kind", ["/dev/zero", "pipe", "loop"])
def test_links_to_special_files_and_loops_are_one_line(kind: str, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(0))
    if kind == "pipe":
        os.mkfifo(tmp_path / "fifo")
        os.symlink(tmp_path / "fifo", folder / "z.png")
        reason = "a pipe"
    elif kind == "loop":
        os.symlink("z.png", folder / "z.png")
        reason = "symbolic links"
    else:
        os.symlink("/dev/zero", folder / "z.png")
        reason = "a device"
    error_line(train_on(folder, tmp_path), "z.png", reason)
    with pytest.raises(DatasetError, match=reason):
        open_image_dataset("folder", path=folder, resolution=8)


def test_dataset_json_bombs_and_nesting_are_one_line(tmp_path: Path) -> None:
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", png(0))
        zf.writestr("b.png", png(1))
        with zf.open("dataset.json", "w", force_zip64=True) as member:
            member.write(b'{"labels": [["a.png", 0], ["b.png", 1]], "pad": "')
            for _ in range(40):
                member.write(b" " * (1 << 20))
            member.write(b'"}')
    assert big.stat().st_size < 1 << 20
    labels = ("--set", "data.use_labels=true", "--set", "net.num_classes=2")
    error_line(train_on(big, tmp_path, *labels), "dataset.json", "inflates to")
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "a.png").write_bytes(png(0))
    (deep / "dataset.json").write_text('{"labels": [["a.png", ' + "[" * 50_000 + "]" * 50_000
                                       + "]]}")
    error_line(train_on(deep, tmp_path, *labels), "dataset.json", "nested deeper")


def test_a_deeply_nested_spec_json_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.json").write_text('{"job": "teacher", "spec": {"net": ' + "[" * 100_000
                                   + "]" * 100_000 + "}}")
    error_line(invoke("distill", "--teacher", run, "--out", tmp_path / "s"), "spec.json",
               "nested deeper")
    assert not (tmp_path / "s").exists()


# ---- cause 6: the FID reference cache follows content ------------------------------------------


class TinyFeatures(nn.Module):
    """A deterministic stand-in for Inception: (N, 3, H, W) in [0, 255] -> (N, 16)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(48, 16, generator=gen), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1) @ self.proj)


def test_reference_cache_is_keyed_on_content(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    info = InceptionInfo(name="tiny", source="test", path="-", sha256="0" * 64, size_bytes=0,
                         input_scaling="x/255")
    model = TinyFeatures().eval()
    monkeypatch.setattr(fid_mod, "load_inception", lambda *a, **k: (model, info))
    rng = np.random.default_rng(0)
    samples, ref = tmp_path / "samples", tmp_path / "ref"
    for folder in (samples, ref):
        folder.mkdir()
        for i in range(6):  # BMP: the same byte length whatever the pixels
            PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                folder / f"{i:03d}.bmp")
    cache = tmp_path / "cache"
    first = fid_mod.compute_fid(samples, str(ref), cache_dir=cache, allow_download=False)
    assert not first.reference.cached
    assert fid_mod.compute_fid(samples, str(ref), cache_dir=cache,
                               allow_download=False).reference.cached
    sizes = {p.name: p.stat().st_size for p in ref.iterdir()}
    for path in sorted(ref.iterdir()):  # every image black, same size, same mtime
        st = path.stat()
        PIL.Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert {p.name: p.stat().st_size for p in ref.iterdir()} == sizes
    changed = fid_mod.compute_fid(samples, str(ref), cache_dir=cache, allow_download=False)
    assert not changed.reference.cached
    assert changed.fid != pytest.approx(first.fid)


# ---- npz files: headers claiming terabytes, members that are not arrays ------------------------


def npz_with_header(path: Path, key: str, shape: tuple[int, ...], payload: bytes) -> Path:
    """An .npz whose member `key` has an .npy header claiming `shape` float32 over `payload`."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False,
                                                  "shape": shape})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{key}.npy", buffer.getvalue() + payload)
    return path


def test_npz_headers_claiming_terabytes_are_refused(toy_teacher: Path, tmp_path: Path) -> None:
    huge = npz_with_header(tmp_path / "huge.npz", "points", (10**12, 2), bytes(64))
    error_line(invoke("eval", "toy", huge, "--teacher", toy_teacher, "-n", "100"), "huge.npz",
               "claims shape")
    images = npz_with_header(tmp_path / "images.npz", "images", (10**9, 32, 32, 3), bytes(64))
    error_line(invoke("eval", "fid", images, "--ref", images, "--offline"), "images.npz")
    stats = npz_with_header(tmp_path / "stats.npz", "mu", (2048,), bytes(8192))
    with zipfile.ZipFile(stats, "a") as zf:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False,
                                                      "shape": (10**6, 10**6)})
        zf.writestr("sigma.npy", buffer.getvalue() + bytes(64))
    error_line(invoke("eval", "fid", images, "--ref", stats, "--offline"))
    with pytest.raises(ValueError, match="claims shape"):
        load_npz(stats)


def test_npz_members_that_are_not_arrays_are_refused(toy_teacher: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, points=np.array([object(), 1], dtype=object))
    error_line(invoke("eval", "toy", pickled, "--teacher", toy_teacher, "-n", "100"),
               "pickled.npz", "Python objects")
    text = tmp_path / "text.npz"
    with zipfile.ZipFile(text, "w") as zf:
        zf.writestr("points", "not an array at all")
    error_line(invoke("eval", "toy", text, "--teacher", toy_teacher, "-n", "100"), "text.npz",
               "not an array")
    error_line(invoke("eval", "fid", text, "--ref", text, "--offline"), "text.npz")


# ---- sizes past any machine ---------------------------------------------------------------------


@pytest.mark.parametrize(("args", "field"), [
    (["-n", "1000000000"], "sample.num_samples"),
    (["--batch-size", "1000000000"], "sample.batch_size"),
    (["--steps", "99999999999999999999"], "sample.steps"),
])
def test_impossible_sample_sizes_are_refused_at_once(teacher: Path, tmp_path: Path,
                                                     args: list[str], field: str) -> None:
    error_line(invoke("sample", teacher, "--out", tmp_path / "s", *args), field)
    assert not (tmp_path / "s").exists()


def test_student_nfe_past_any_bound_is_one_line(toy_teacher: Path, tmp_path: Path) -> None:
    error_line(invoke("sample", toy_teacher, "--out", tmp_path / "s", "--nfe",
                      "99999999999999999999"), "sample.nfe")


def test_samples_that_cannot_fit_the_disk_are_refused_up_front(
        teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    class Small:  # what statvfs says of a nearly full file system
        def __init__(self, fs: os.statvfs_result) -> None:
            self.f_frsize, self.f_files = fs.f_frsize, 1000
            self.f_bavail, self.f_favail = 100, 50

    from traflow_cli.jobs import sample as sample_job

    monkeypatch.setattr(sample_job.os, "statvfs", lambda path: Small(real(path)))
    error_line(invoke("sample", teacher, "--out", tmp_path / "s", "-n", "1000"),
               "sample.num_samples", "free space")
    assert not (tmp_path / "s").exists()
    monkeypatch.undo()
    fs = os.statvfs(tmp_path)
    if fs.f_files and fs.f_favail < MAX_SAMPLES:  # the real file system: more files than inodes
        error_line(invoke("sample", teacher, "--out", tmp_path / "t", "-n", str(MAX_SAMPLES)),
                   "sample.num_samples", "files")
        assert not (tmp_path / "t").exists()


def test_eval_num_samples_past_the_bound_in_a_spec_json(toy_teacher: Path, tmp_path: Path) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(toy_teacher, edited)
    record = json.loads((edited / "spec.json").read_text())
    record["spec"]["eval"]["num_samples"] = 10**11
    (edited / "spec.json").write_text(json.dumps(record))
    error_line(invoke("eval", "toy", "--teacher", edited), "eval.num_samples")
