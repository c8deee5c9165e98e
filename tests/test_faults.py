"""Corrupt inputs end in one line naming the file (and its zip or folder), exit code 2, never a
traceback: training images, FID samples, and the samples.npz files of `eval toy`.

Faults are injected as a probe would: a truncated image, random bytes or a zero-byte file with an
image extension, text that is not an image, a dangling link, a zip member whose CRC fails.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import invoke
from torch import nn

from traflow_cli.data.images import DatasetError, open_image_dataset
from traflow_cli.metrics import fid as fid_mod
from traflow_cli.metrics.features import extract_features
from traflow_cli.metrics.fid import FIDError
from traflow_cli.metrics.image_sets import open_image_set
from traflow_cli.metrics.inception import InceptionInfo

RNG = np.random.default_rng(0)
BAD = "img002"  # the faulty member among img000 .. img004


def encode(fmt: str, size: int = 8) -> bytes:
    """A random RGB image of size x size in the given PIL format."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


# fault -> (extension, bytes of the bad file given the image size, when the training data
# catches it: at "open" or at "decode"). A PNG's signature and IHDR chunk take 33 bytes: cut at
# 60, its header still reads; a JPEG cut 40 bytes short keeps its headers, loses its last pixels.
FAULTS: dict[str, tuple[str, Callable[[int], bytes], str]] = {
    "truncated png": (".png", lambda size: encode("PNG", size)[:60], "decode"),
    "truncated jpeg": (".jpg", lambda size: encode("JPEG", size)[:-40], "decode"),
    "random bytes": (".png", lambda _: RNG.integers(0, 256, 300, dtype=np.uint8).tobytes(), "open"),
    "zero bytes": (".png", lambda _: b"", "open"),
    "text, not an image": (".jpg", lambda _: b"notes about the shoot, not a picture\n", "open"),
}


def flip_member_byte(zip_path: Path, member: str) -> None:
    """Corrupt one byte of a stored member's data in place, so that its CRC check fails."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
    raw = bytearray(zip_path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.compress_size - 20] ^= 0xFF  # inside the last chunk, past the header
    zip_path.write_bytes(bytes(raw))


def image_set(root: Path, fault: str, *, as_zip: bool, size: int = 8) -> tuple[Path, str, str]:
    """Five images, one of them faulty, as a folder or a stored zip; (path, bad member, stage)."""
    files = {f"img{i:03d}.png": encode("PNG", size) for i in range(5)}
    if fault in FAULTS:
        ext, make, stage = FAULTS[fault]
        del files[f"{BAD}.png"]
        files[f"{BAD}{ext}"] = make(size)
    else:  # "bad crc" (zip) and "dangling link" (folder) are made below
        ext, stage = ".png", "open"
    bad = f"sub/{BAD}{ext}"
    files = {f"sub/{name}" if name.startswith(BAD) else name: data for name, data in files.items()}
    root.mkdir(parents=True, exist_ok=True)
    if as_zip:
        path = root / "images.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        if fault == "bad crc":
            flip_member_byte(path, bad)
        return path, bad, stage
    path = root / "images"
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    if fault == "dangling link":  # a file that cannot be read (permissions do not bind root)
        (path / bad).unlink()
        os.symlink(path / "gone.png", path / bad)
    return path, bad, stage


CASES = [(f, z) for f in FAULTS for z in (True, False)] + [("bad crc", True), ("dangling link", False)]


def assert_names_the_file(message: str, path: Path, member: str) -> None:
    assert "\n" not in message, message
    assert f"'{member}'" in message and str(path) in message, message


# ---- training data ----------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "as_zip"), CASES)
def test_a_bad_training_image_is_named_with_its_zip_or_folder(tmp_path: Path, fault: str,
                                                              as_zip: bool) -> None:
    path, bad, stage = image_set(tmp_path, fault, as_zip=as_zip)
    if stage == "open":  # the header check at open catches it: the run fails in its first second
        with pytest.raises(DatasetError) as info:
            open_image_dataset("folder", path=path, resolution=8)
        assert_names_the_file(str(info.value), path, bad)
        return
    dataset = open_image_dataset("folder", path=path, resolution=8)  # sound header: opens
    assert dataset.files.index(bad) == 4 and len(dataset) == 5
    assert dataset[0][0].shape == (3, 8, 8)  # the good images still read
    with pytest.raises(DatasetError) as info:  # first drawn, lazily
        dataset.get_batch(range(5))
    assert_names_the_file(str(info.value), path, bad)
    with pytest.raises(DatasetError) as info:  # or at once, when preloading
        dataset.preload()
    assert_names_the_file(str(info.value), path, bad)


def one_error_line(result) -> str:
    """The CLI's failure: exit code 2, no traceback, exactly one `error:` line, and it is last."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    return errors[0]


@pytest.mark.parametrize(("fault", "as_zip", "preload"), [
    ("truncated png", True, "false"),   # caught when the first batch decodes it
    ("truncated jpeg", False, "true"),  # caught by the preload, before the first step
    ("random bytes", False, "false"),
    ("zero bytes", True, "false"),
    ("text, not an image", False, "false"),
    ("bad crc", True, "false"),
    ("dangling link", False, "false"),
])
def test_teacher_training_on_a_bad_image_exits_2_naming_it(tmp_path: Path, fault: str,
                                                           as_zip: bool, preload: str) -> None:
    path, bad, _ = image_set(tmp_path, fault, as_zip=as_zip)
    # Batch 5 draws every image in the first step.
    result = invoke("teacher", "train", "--preset", "shapes32", "--set", "data.name=folder",
                    "--set", f"data.path={path}", "--set", "data.resolution=8",
                    "--set", "net.image_size=8", "--set", "teacher.batch_size=5",
                    "--set", f"data.preload={preload}", "--steps", "1", "--device", "cpu",
                    "--out", tmp_path / "run")
    line = one_error_line(result)
    assert_names_the_file(line, path, bad)
    assert not (tmp_path / "run" / "checkpoints").exists()  # no step was taken


# ---- FID --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "as_zip"), [
    ("random bytes", False), ("zero bytes", True), ("text, not an image", False), ("bad crc", True),
])
def test_eval_fid_names_a_sample_that_is_not_an_image(tmp_path: Path, fault: str,
                                                      as_zip: bool) -> None:
    samples, bad, _ = image_set(tmp_path / "s", fault, as_zip=as_zip, size=32)
    reference, _, _ = image_set(tmp_path / "r", "none", as_zip=False, size=32)
    line = one_error_line(invoke("eval", "fid", samples, "--ref", reference, "--offline"))
    assert_names_the_file(line, samples, bad)


class PooledFeatures(nn.Module):
    """A small fixed feature network in Inception's place: (N, 3, H, W) in [0, 255] -> (N, 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(12, 12, generator=torch.Generator().manual_seed(0)),
                                 requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x / 255.0, 2).flatten(1) @ self.proj


@pytest.mark.parametrize(("fault", "as_zip"), [("truncated png", True), ("truncated jpeg", False)])
def test_fid_names_a_sample_that_fails_to_decode(tmp_path: Path, fault: str, as_zip: bool) -> None:
    samples, bad, _ = image_set(tmp_path, fault, as_zip=as_zip, size=32)
    images = open_image_set(samples)  # sound headers: listing passes
    with pytest.raises(FIDError) as info:
        extract_features(images, PooledFeatures(), mode="clean", batch_size=2)
    assert_names_the_file(str(info.value), samples, bad)


def test_eval_fid_on_a_truncated_sample_exits_2_naming_it(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    info = InceptionInfo(name="pooled", source="test", path="-", sha256="0" * 64, size_bytes=0,
                         input_scaling="x/255")
    monkeypatch.setattr(fid_mod, "load_inception", lambda *a, **k: (PooledFeatures(), info))
    monkeypatch.setenv("TRAFLOW_CACHE", str(tmp_path / "cache"))
    samples, bad, _ = image_set(tmp_path / "s", "truncated png", as_zip=False, size=32)
    reference, _, _ = image_set(tmp_path / "r", "none", as_zip=True, size=32)
    line = one_error_line(invoke("eval", "fid", samples, "--ref", reference, "--offline",
                                 "--device", "cpu", "--mode", "clean"))
    assert_names_the_file(line, samples, bad)


def test_fid_and_training_list_the_same_images(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    for name in ["b.png", "a/c.PNG", "a/d.jpg", ".hidden/e.png", "._f.png", "__MACOSX/g.png",
                 "notes.txt", "dataset.json"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode("JPEG" if name.endswith(".jpg") else "PNG"))
    dataset = open_image_dataset("folder", path=root, resolution=8)
    images = open_image_set(root)
    assert dataset.files == [images.name_of(f) for f in images.files] == ["a/c.PNG", "a/d.jpg",
                                                                         "b.png"]


# ---- eval toy: samples.npz --------------------------------------------------------------------


def toy_file(folder: Path, kind: str) -> Path:
    """A samples file for `eval toy`, broken in the named way ("good" is not broken)."""
    path = folder / f"{kind.replace(' ', '-')}.npz"
    points = RNG.standard_normal((300, 2)).astype(np.float32)
    if kind == "good":
        np.savez(path, points=points)
    elif kind == "random bytes":
        path.write_bytes(RNG.integers(0, 256, 400, dtype=np.uint8).tobytes())
    elif kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "truncated":
        np.savez(path, points=points)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "wrong keys":
        np.savez(path, images=np.zeros((4, 8, 8, 3), np.uint8))
    elif kind == "wrong shape":
        np.savez(path, points=np.zeros((300, 3), np.float32))
    elif kind == "object array":
        np.savez(path, points=np.array([{"x": 1}, None], dtype=object))
    elif kind == "bare npy":
        np.save(path.with_suffix(".npy"), points)
        path.with_suffix(".npy").rename(path)
    elif kind == "a folder":
        path.mkdir()
    return path  # "missing": never written


@pytest.mark.parametrize("kind", ["missing", "random bytes", "zero bytes", "truncated", "wrong keys",
                                  "wrong shape", "object array", "bare npy", "a folder"])
def test_eval_toy_names_a_bad_samples_file(tmp_path: Path, kind: str) -> None:
    path = toy_file(tmp_path, kind)
    line = one_error_line(invoke("eval", "toy", path, "-n", "300", "--device", "cpu",
                                 "--out", tmp_path / "eval"))
    assert str(path) in line and "samples.npz" in line, line
    assert not (tmp_path / "eval").exists()  # failed before measuring anything


def test_eval_toy_measures_a_good_samples_file(tmp_path: Path) -> None:
    path = toy_file(tmp_path, "good")
    result = invoke("eval", "toy", path, "-n", "300", "--device", "cpu", "--json",
                    "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert str(path) in result.stdout and (tmp_path / "eval" / "eval.json").is_file()
