"""Image datasets: shapes32, EDM-layout zips and folders, errors, and a real CIFAR-10 zip."""

from __future__ import annotations

import importlib.util
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import CIFAR10_SAMPLE_ZIP
from torch.utils.data import DataLoader

from traflow_cli.data.images import (
    DatasetNotFoundError,
    EDMImageDataset,
    hflip_batch,
    open_image_dataset,
    to_model_range,
)
from traflow_cli.data.shapes import ShapesDataset, draw_shapes

CLASSES = ("cat", "dog")


# ---- shapes32 ---------------------------------------------------------------------------------


def test_shapes_are_a_function_of_the_index_alone() -> None:
    ds = ShapesDataset(size=400, use_labels=True)
    assert torch.equal(ds[7][0], ds[7][0])
    batch, labels = ds.get_batch(torch.tensor([9, 7, 399]))
    assert torch.equal(batch[1], ds[7][0]) and int(labels[1]) == ds[7][1]
    # The same image whatever batch it is drawn in, and whether preloaded or not.
    all_images, _ = draw_shapes(torch.arange(400))
    assert torch.equal(all_images[7], ds[7][0])
    assert torch.equal(ShapesDataset(size=400).preload().get_batch([5, 6])[0], all_images[5:7])
    # Distinct indices give distinct images.
    flat = all_images.reshape(400, -1)
    assert len(torch.unique(flat, dim=0)) == 400
    # A held-out split is just later indices.
    assert torch.equal(ShapesDataset(size=10, offset=100)[0][0], draw_shapes([100])[0][0])


def test_shapes_values_labels_and_resolution() -> None:
    images, labels = ShapesDataset(size=300, use_labels=True).preload().get_batch(range(300))
    assert images.shape == (300, 3, 32, 32) and images.dtype == torch.uint8
    assert images.min() < 40 and images.max() > 215  # uses the whole range across the set
    assert set(labels.tolist()) == {0, 1, 2}
    assert max(labels.bincount().tolist()) < 2 * min(labels.bincount().tolist())  # balanced-ish
    # Every image shows a shape: the pixels are not all one colour.
    assert (images.reshape(300, -1).float().std(dim=1) > 5).all()
    unlabelled = ShapesDataset(size=5)
    assert unlabelled.num_classes == 0 and unlabelled[0][1] == -1
    big = open_image_dataset("shapes32", path=None, resolution=64, use_labels=True)
    assert big[0][0].shape == (3, 64, 64) and big.num_classes == 3 and len(big) == 50_000


def test_to_model_range_and_flips() -> None:
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1)
    y = to_model_range(x)
    assert y.dtype == torch.float32
    assert y.flatten().tolist()[:2] == [-1.0, 1.0] and abs(y.flatten()[2].item()) < 0.01

    images = ShapesDataset(size=64).get_batch(range(64))[0]
    a = hflip_batch(images, torch.Generator().manual_seed(0))
    b = hflip_batch(images, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    flipped = torch.tensor([torch.equal(a[i], images[i].flip(-1)) for i in range(64)])
    kept = torch.tensor([torch.equal(a[i], images[i]) for i in range(64)])
    assert (flipped | kept).all() and 10 < int(flipped.sum()) < 54


# ---- EDM layout -------------------------------------------------------------------------------


def _make_images(n: int, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _write_edm(root: Path, arrays: list[np.ndarray], *, labels: bool, as_zip: bool,
               ext: str = ".png") -> tuple[Path, list[str]]:
    """Write arrays as CLASS/NNNN.png (EDM layout) in a folder or zip; returns (path, names)."""
    names = [f"{CLASSES[i % 2]}/{i:04d}{ext}" for i in range(len(arrays))]
    files: dict[str, bytes] = {}
    for name, array in zip(names, arrays, strict=True):
        buffer = __import__("io").BytesIO()
        PIL.Image.fromarray(array).save(buffer, format="PNG" if ext == ".png" else "JPEG")
        files[name] = buffer.getvalue()
    if labels:
        meta = {"labels": [[n, i % 2] for i, n in enumerate(names)], "classes": list(CLASSES)}
        files["dataset.json"] = json.dumps(meta).encode()
    if as_zip:
        path = root / "data.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return path, names
    path = root / "data"
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path, names


@pytest.mark.parametrize("as_zip", [True, False])
@pytest.mark.parametrize("labels", [True, False])
def test_edm_zip_and_folder_read_back(tmp_path: Path, as_zip: bool, labels: bool) -> None:
    arrays = _make_images(6)
    path, names = _write_edm(tmp_path, arrays, labels=labels, as_zip=as_zip)
    ds = open_image_dataset("folder", path=path, resolution=8, use_labels=labels)
    assert len(ds) == 6 and ds.channels == 3 and ds.resolution == 8
    assert ds.num_classes == (2 if labels else 0)
    order = sorted(range(6), key=lambda i: names[i])  # items follow sorted file names
    for item, i in enumerate(order):
        image, label = ds[item]
        assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
        assert torch.equal(image, torch.from_numpy(arrays[i]).permute(2, 0, 1))
        assert label == (i % 2 if labels else -1)
    lazy = ds.get_batch([0, 5])
    ds.preload()
    assert ds.preloaded and all(torch.equal(a, b) for a, b in zip(lazy, ds.get_batch([0, 5]),
                                                                  strict=True))


def test_edm_zip_survives_pickling_and_worker_processes(tmp_path: Path) -> None:
    arrays = _make_images(8)
    path, _ = _write_edm(tmp_path, arrays, labels=True, as_zip=True)
    ds = open_image_dataset("folder", path=path, resolution=8, use_labels=True)
    expected = ds.get_batch(range(8))[0]
    clone = pickle.loads(pickle.dumps(ds))  # the open zip handle is dropped, then reopened
    assert torch.equal(clone.get_batch(range(8))[0], expected)
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    assert torch.equal(torch.cat([images for images, _ in loader]), expected)


def test_grey_jpeg_folder(tmp_path: Path) -> None:
    arrays = _make_images(3, size=(16, 16), mode="L")
    path, _ = _write_edm(tmp_path, arrays, labels=False, as_zip=False, ext=".jpg")
    ds = open_image_dataset("folder", path=path, resolution=16)
    assert ds.channels == 1 and ds[0][0].shape == (1, 16, 16)
    with PIL.Image.open(path / "cat" / "0000.jpg") as pil:
        assert np.array_equal(ds[0][0][0].numpy(), np.asarray(pil))


def test_mixed_sizes_are_refused_in_one_line(tmp_path: Path) -> None:
    arrays = _make_images(4) + _make_images(1, size=(8, 9))
    path, names = _write_edm(tmp_path, arrays, labels=False, as_zip=True)
    with pytest.raises(ValueError, match="differ in size") as info:
        open_image_dataset("folder", path=path, resolution=8)
    message = str(info.value)
    assert "\n" not in message and f"'{names[4]}' is 8x9" in message


def test_resolution_and_label_mismatches_are_one_line(tmp_path: Path) -> None:
    path, _ = _write_edm(tmp_path, _make_images(2), labels=False, as_zip=True)
    with pytest.raises(ValueError, match=r"are 8x8 but data.resolution=32; pass --set") as info:
        open_image_dataset("folder", path=path, resolution=32)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="dataset.json' does not exist") as info:
        open_image_dataset("folder", path=path, resolution=8, use_labels=True)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        open_image_dataset("mnist", path=path, resolution=8)


def test_celeba_faces_are_centre_cropped(tmp_path: Path) -> None:
    face = np.zeros((218, 178, 3), dtype=np.uint8)
    face[39:179, 19:159] = 200  # exactly the 140x140 centre crop of an aligned CelebA image
    path, _ = _write_edm(tmp_path, [face, face], labels=False, as_zip=False)
    ds = open_image_dataset("celeba64", path=path, resolution=64)
    image = ds[0][0]
    assert image.shape == (3, 64, 64) and (image == 200).all()


def test_ffhq_square_images_are_downscaled(tmp_path: Path) -> None:
    path, _ = _write_edm(tmp_path, _make_images(2, size=(128, 128)), labels=False, as_zip=True)
    ds = open_image_dataset("ffhq64", path=path, resolution=64)
    assert ds[1][0].shape == (3, 64, 64)


def test_missing_datasets_raise_one_line_not_found(tmp_path: Path, monkeypatch) -> None:
    missing = tmp_path / "nowhere"
    for name in ["cifar10", "celeba64", "ffhq64", "imagenet64", "folder"]:
        resolution = 32 if name in ("cifar10", "folder") else 64
        with pytest.raises(DatasetNotFoundError) as info:
            open_image_dataset(name, path=missing, resolution=resolution)
        message = str(info.value)
        assert str(missing) in message and "\n" not in message and message.startswith(name)
        assert isinstance(info.value, FileNotFoundError)
    assert "data.download=true" in str(pytest.raises(
        DatasetNotFoundError, open_image_dataset, "cifar10", path=missing, resolution=32).value)
    monkeypatch.setenv("TRAFLOW_DATA", str(tmp_path / "root"))
    with pytest.raises(DatasetNotFoundError, match="root"):
        open_image_dataset("cifar10", path=None, resolution=32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "dataset.json").write_text("{}")
    with pytest.raises(DatasetNotFoundError, match="no images"):
        EDMImageDataset(tmp_path / "empty", resolution=32)


def test_sizes_found_past_large_headers_and_in_other_formats(tmp_path: Path) -> None:
    folder = tmp_path / "mixed_formats"
    folder.mkdir()
    arrays = _make_images(2, size=(12, 12))
    exif = PIL.Image.Exif()
    exif[0x010E] = "x" * 5000  # ImageDescription: pushes the JPEG frame header past 2 KB
    PIL.Image.fromarray(arrays[0]).save(folder / "a.jpg", exif=exif)
    PIL.Image.fromarray(arrays[1]).save(folder / "b.bmp")
    ds = open_image_dataset("folder", path=folder, resolution=12)
    assert len(ds) == 2 and ds.channels == 3
    assert torch.equal(ds[1][0], torch.from_numpy(arrays[1]).permute(2, 0, 1))


def test_cifar10_through_torchvision(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DatasetNotFoundError, match="reading") as info:  # files torchvision rejects
        open_image_dataset("cifar10", path=tmp_path, resolution=32)
    assert "\n" not in str(info.value)

    class FakeCIFAR10:  # what torchvision.datasets.CIFAR10 exposes: data [N, 32, 32, 3], targets
        def __init__(self, root: str, train: bool, download: bool) -> None:
            n = 5 if train else 3
            self.data = np.arange(n * 32 * 32 * 3, dtype=np.int64).reshape(n, 32, 32, 3) % 251
            self.data = self.data.astype(np.uint8)
            self.targets = list(range(n))

    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    ds = open_image_dataset("cifar10", path=tmp_path / "cifar-10-batches-py", resolution=32,
                            use_labels=True)
    assert len(ds) == 5 and ds.num_classes == 10 and ds.preloaded and ds[4][1] == 4
    expected = torch.from_numpy(FakeCIFAR10("", True, False).data[2]).permute(2, 0, 1)
    assert torch.equal(ds[2][0], expected)
    assert len(open_image_dataset("cifar10", path=tmp_path, resolution=32, split="test")) == 3
    with pytest.raises(ValueError, match="data.resolution=64; set data.resolution=32"):
        open_image_dataset("cifar10", path=tmp_path, resolution=64)


# ---- a real CIFAR-10 JPEG zip (the repository's 300-image sample of the test split) -------------


def test_real_cifar10_test_zip() -> None:
    ds = open_image_dataset("cifar10", path=CIFAR10_SAMPLE_ZIP, resolution=32, use_labels=True)
    assert len(ds) == 300 and ds.num_classes == 10 and ds.channels == 3
    with zipfile.ZipFile(CIFAR10_SAMPLE_ZIP) as zf:
        classes = json.loads(zf.read("dataset.json"))["classes"]
    assert classes == sorted(classes) and len(classes) == 10
    files = ds.files
    for i in [0, 29, 30, 123, 299]:
        image, label = ds[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
        assert classes[label] == files[i].split("/")[0]  # label matches the folder name
    images, labels = ds.get_batch(range(300))
    assert labels.bincount().tolist() == [30] * 10
    assert images.float().std() > 30  # real pictures, not a blank or constant image
    # The cifar10-cpu preset's resolution: the same zip downscaled to 16x16.
    small = open_image_dataset("cifar10", path=CIFAR10_SAMPLE_ZIP, resolution=16)
    assert len(small) == 300 and small[7][0].shape == (3, 16, 16) and small[7][1] == -1


def test_the_sample_script_keeps_the_first_images_of_each_class(tmp_path: Path) -> None:
    """tests/fixtures/make_cifar10_sample.py on a small zip of the same layout: the first
    `per_class` of each class, bytes unchanged, and the same output twice."""
    spec = importlib.util.spec_from_file_location(
        "make_cifar10_sample", CIFAR10_SAMPLE_ZIP.parent / "make_cifar10_sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    labels = [[f"{c}/{i:04d}.jpg", k] for k, c in enumerate(CLASSES) for i in range(4)]
    with zipfile.ZipFile(tmp_path / "full.zip", "w") as zf:
        for path, _ in labels:
            zf.writestr(path, f"jpeg bytes of {path}")
        zf.writestr("dataset.json", json.dumps({"labels": labels, "classes": list(CLASSES)}))
    assert script.make_sample(tmp_path / "full.zip", tmp_path / "a.zip", per_class=2) == 4
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        assert zf.namelist() == ["cat/0000.jpg", "cat/0001.jpg", "dog/0000.jpg", "dog/0001.jpg",
                                 "dataset.json"]
        assert zf.read("dog/0001.jpg") == b"jpeg bytes of dog/0001.jpg"
        assert json.loads(zf.read("dataset.json")) == {
            "labels": [[p, k] for p, k in labels if int(p[-8:-4]) < 2], "classes": list(CLASSES)}
    script.make_sample(tmp_path / "full.zip", tmp_path / "b.zip", per_class=2)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
