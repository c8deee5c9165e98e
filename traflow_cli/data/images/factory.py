"""open_image_dataset: a dataset name, path and resolution -> the dataset that reads it."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from traflow_cli.data.images.dataset import ImageDataset
from traflow_cli.data.images.edm import EDMImageDataset
from traflow_cli.data.images.errors import DatasetNotFoundError
from traflow_cli.data.images.files import folder_has_images
from traflow_cli.data.images.torchvision_sets import CelebA64, cifar10_torchvision
from traflow_cli.data.shapes import ShapesDataset

IMAGE_DATASETS = ("cifar10", "celeba64", "ffhq64", "afhqv2-64", "imagenet64", "folder",
                  "shapes32")


def default_data_root() -> Path:
    """Where datasets live when no path is given: $TRAFLOW_DATA or ~/.cache/traflow/data."""
    return Path(os.environ.get("TRAFLOW_DATA", "~/.cache/traflow/data")).expanduser()


def _is_edm_source(path: Path) -> bool:
    """Whether path is a zip, or a folder holding images or a dataset.json (EDM layout)."""
    if path.is_file():
        return zipfile.is_zipfile(path)
    if not path.is_dir():
        return False
    try:
        return (path / "dataset.json").is_file() or folder_has_images(path)
    except OSError:  # an unreadable folder: the dataset reader says which, in one line
        return True


def _not_found(name: str, path: Path | None, looked_for: str, online: bool) -> DatasetNotFoundError:
    """The one-line error for a dataset that is not at `path`."""
    where = f"no dataset at '{path}'" if path is not None else "no data.path given"
    how = "pass --set data.path=..."
    if online:
        how += " or --set data.download=true when online"
    return DatasetNotFoundError(f"{name}: {where} (looked for {looked_for}); {how}")


def _require_resolution(name: str, resolution: int, native: int) -> None:
    if resolution != native:
        raise ValueError(f"{name}: images are {native}x{native} but data.resolution={resolution}; "
                         f"set data.resolution={native}")


def open_image_dataset(
    name: str, *, path: str | Path | None, resolution: int, split: str = "train",
    download: bool = False, use_labels: bool = False,
) -> ImageDataset:
    """Open the named dataset; items are (uint8 [C, res, res], label or -1)."""
    # `split` picks torchvision's split (CIFAR-10: train or test; CelebA: train, valid, test, all)
    # and shapes32's held-out indices; a zip or folder is whatever split it holds.
    if split not in ("train", "test", "val", "valid", "validation", "all"):
        raise ValueError(f"{name}: unknown data.split={split!r}; expected train, test, val or all")
    root = Path(path).expanduser() if path is not None else None

    if name == "shapes32":
        # Held-out images are simply later indices: image i depends on i alone.
        size, offset = (50_000, 0) if split == "train" else (10_000, 50_000)
        return ShapesDataset(size=size, resolution=resolution, use_labels=use_labels, offset=offset)

    if name == "cifar10":
        if resolution > 32 or 32 % resolution:
            raise ValueError(f"cifar10: images are 32x32 but data.resolution={resolution}; set "
                             "data.resolution=32, or a divisor of it (16, 8) to downscale them")
        root = root if root is not None else default_data_root() / "cifar10"
        if root.name == "cifar-10-batches-py" and root.is_dir():
            root = root.parent  # the user pointed at the extracted folder itself
        train = split == "train"  # CIFAR-10 has no validation split: anything else is test
        on_disk = (root / "cifar-10-batches-py").is_dir()
        if not on_disk and _is_edm_source(root):
            return EDMImageDataset(root, resolution=resolution, name=name, use_labels=use_labels,
                                   fit="exact" if resolution == 32 else "downscale")
        if on_disk or download:
            try:
                return cifar10_torchvision(root, train, download, use_labels, resolution)
            except (OSError, RuntimeError) as err:  # offline, or files torchvision finds corrupt
                msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                action = "download to" if download and not on_disk else "reading"
                raise DatasetNotFoundError(
                    f"cifar10: {action} '{root}' failed ({msg}); pass --set data.path=... "
                    "pointing at a CIFAR-10 folder or an EDM-style zip"
                ) from err
        raise _not_found(name, root, "a torchvision CIFAR-10 folder or an EDM-style zip/folder",
                         online=True)

    if name == "celeba64":
        _require_resolution(name, resolution, 64)
        if use_labels:
            raise ValueError("celeba64: has no class labels; set data.use_labels=false")
        root = root if root is not None else default_data_root() / "celeba64"
        if (root / "celeba" / "img_align_celeba").is_dir() or download:
            tv_split = {"val": "valid", "validation": "valid"}.get(split, split)
            try:
                return CelebA64(root, split=tv_split, resolution=resolution, download=download)
            except (OSError, RuntimeError) as err:
                msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise DatasetNotFoundError(
                    f"celeba64: could not open torchvision CelebA under '{root}' ({msg}); it needs "
                    "celeba/img_align_celeba/ and celeba/list_eval_partition.txt etc."
                ) from err
        if _is_edm_source(root):
            return EDMImageDataset(root, resolution=resolution, name=name, fit="celeba")
        raise _not_found(name, root, "a torchvision CelebA folder (celeba/img_align_celeba) or an "
                         "EDM-style zip/folder of aligned faces", online=True)

    if name in ("ffhq64", "afhqv2-64", "imagenet64"):
        _require_resolution(name, resolution, 64)
        if name != "imagenet64" and use_labels:
            raise ValueError(f"{name}: has no class labels; set data.use_labels=false")
        if root is None or not _is_edm_source(root):
            tool = ("--transform=center-crop --resolution=64x64" if name == "imagenet64"
                    else "--resolution=64x64")
            where = f"no dataset at '{root}'" if root is not None else "no data.path given"
            raise DatasetNotFoundError(
                f"{name}: {where} (looked for an EDM-style zip/folder); prepare one with EDM's "
                f"dataset_tool.py {tool} and pass --set data.path=..."
            )
        # FFHQ thumbnails/1024px and AFHQv2's 512px are square: downscaled as dataset_tool does.
        fit = "exact" if name == "imagenet64" else "downscale"
        return EDMImageDataset(root, resolution=resolution, name=name, use_labels=use_labels,
                               fit=fit)

    if name == "folder":
        if root is None or not _is_edm_source(root):
            raise _not_found(name, root, "a zip or folder of images, optionally with dataset.json",
                             online=False)
        return EDMImageDataset(root, resolution=resolution, name=name, use_labels=use_labels)

    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(IMAGE_DATASETS)}")
