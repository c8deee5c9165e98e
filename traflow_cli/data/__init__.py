"""Datasets: exact toy 2-D distributions and image datasets, all as float tensors in model range.

Every name loads its submodule on first use, so importing one part (the torch-free image file
lister, say) never pays for the others:

    from traflow_cli.data import open_image_dataset, to_model_range
    shapes = open_image_dataset("shapes32", path=None, resolution=32)   # no download needed
    images, labels = shapes.get_batch(range(16))                        # uint8 [16, 3, 32, 32]
    x = to_model_range(images)                                          # float [-1, 1]
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from traflow_cli.data.images import (
        IMAGE_DATASETS,
        DatasetError,
        DatasetNotFoundError,
        EDMImageDataset,
        ImageDataset,
        TensorImageDataset,
        default_data_root,
        hflip_batch,
        open_image_dataset,
        to_model_range,
    )
    from traflow_cli.data.shapes import SHAPE_NAMES, ShapesDataset, draw_shapes
    from traflow_cli.data.stream import batch_indices, load_batch
    from traflow_cli.data.toy import TOY_DISTRIBUTIONS, sample_toy

# name -> the submodule that defines it
_LAZY = {
    **dict.fromkeys(("IMAGE_DATASETS", "DatasetError", "DatasetNotFoundError", "EDMImageDataset",
                     "ImageDataset", "TensorImageDataset", "default_data_root", "hflip_batch",
                     "open_image_dataset", "to_model_range"), "images"),
    **dict.fromkeys(("SHAPE_NAMES", "ShapesDataset", "draw_shapes"), "shapes"),
    **dict.fromkeys(("batch_indices", "load_batch"), "stream"),
    **dict.fromkeys(("TOY_DISTRIBUTIONS", "sample_toy"), "toy"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"traflow_cli.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'traflow_cli.data' has no attribute {name!r}")


__all__ = [
    "IMAGE_DATASETS", "SHAPE_NAMES", "TOY_DISTRIBUTIONS", "DatasetError", "DatasetNotFoundError",
    "EDMImageDataset", "ImageDataset", "ShapesDataset", "TensorImageDataset", "batch_indices",
    "default_data_root", "draw_shapes", "hflip_batch", "load_batch", "open_image_dataset",
    "sample_toy", "to_model_range",
]
