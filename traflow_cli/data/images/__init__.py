"""Image datasets behind one interface: uint8 [C, H, W] images with integer labels (-1 if none).

One job per module: `files` (which files are images), `header` (sizes from header bytes),
`decode` (bytes -> pixels, and why that failed), `resize`, `transforms`, `dataset` (the base
class and in-memory images), `edm` (zip/folder reader), `torchvision_sets` (CIFAR-10, CelebA),
`factory` (open_image_dataset), `errors`. Names load on first use, so the stdlib-only modules
(files, header, errors) never pull in torch or PIL.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from traflow_cli.data.images.dataset import ImageDataset, TensorImageDataset
    from traflow_cli.data.images.edm import EDMImageDataset
    from traflow_cli.data.images.errors import DatasetError, DatasetNotFoundError
    from traflow_cli.data.images.factory import IMAGE_DATASETS, default_data_root, open_image_dataset
    from traflow_cli.data.images.files import IMAGE_EXTENSIONS, folder_image_names, image_names
    from traflow_cli.data.images.resize import celeba_crop_resize, downscale_lanczos
    from traflow_cli.data.images.torchvision_sets import CelebA64
    from traflow_cli.data.images.transforms import hflip_batch, to_model_range

# name -> the submodule that defines it
_LAZY = {
    **dict.fromkeys(("ImageDataset", "TensorImageDataset"), "dataset"),
    "EDMImageDataset": "edm",
    **dict.fromkeys(("DatasetError", "DatasetNotFoundError"), "errors"),
    **dict.fromkeys(("IMAGE_DATASETS", "default_data_root", "open_image_dataset"), "factory"),
    **dict.fromkeys(("IMAGE_EXTENSIONS", "folder_image_names", "image_names"), "files"),
    **dict.fromkeys(("celeba_crop_resize", "downscale_lanczos"), "resize"),
    "CelebA64": "torchvision_sets",
    **dict.fromkeys(("hflip_batch", "to_model_range"), "transforms"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"traflow_cli.data.images.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'traflow_cli.data.images' has no attribute {name!r}")


__all__ = [
    "IMAGE_DATASETS", "IMAGE_EXTENSIONS", "CelebA64", "DatasetError", "DatasetNotFoundError",
    "EDMImageDataset", "ImageDataset", "TensorImageDataset", "celeba_crop_resize",
    "default_data_root", "downscale_lanczos", "folder_image_names", "hflip_batch", "image_names",
    "open_image_dataset", "to_model_range",
]
