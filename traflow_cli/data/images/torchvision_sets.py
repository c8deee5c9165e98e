"""CIFAR-10 and CelebA through torchvision's own readers (and its downloads, when asked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from traflow_cli.data.images.dataset import ImageDataset, TensorImageDataset
from traflow_cli.data.images.decode import READ_ERRORS, read_error_reason
from traflow_cli.data.images.errors import DatasetError
from traflow_cli.data.images.resize import celeba_crop_resize, downscale_lanczos
from traflow_cli.data.images.transforms import hwc_to_chw


def cifar10_torchvision(root: Path, train: bool, download: bool, use_labels: bool,
                        resolution: int = 32) -> ImageDataset:
    """CIFAR-10 through torchvision (root holds cifar-10-batches-py), kept in memory."""
    from torchvision.datasets import CIFAR10

    base = CIFAR10(str(root), train=train, download=download)
    images = torch.from_numpy(np.ascontiguousarray(base.data)).permute(0, 3, 1, 2).contiguous()
    if resolution != 32:  # the same Lanczos filter as a downscaled zip, image by image
        images = torch.stack([downscale_lanczos(image, resolution) for image in images])
    labels = torch.tensor(base.targets, dtype=torch.int64) if use_labels else None
    return TensorImageDataset(images, labels, num_classes=10, name="cifar10")


class CelebA64(ImageDataset):
    """torchvision CelebA (aligned faces), centre-cropped to 140x140 and resized to `resolution`."""

    def __init__(self, root: Path, *, split: str, resolution: int, download: bool) -> None:
        super().__init__()
        from torchvision.datasets import CelebA

        self.name, self.resolution, self.channels, self.num_classes = "celeba64", resolution, 3, 0
        self._base = CelebA(str(root), split=split, target_type=[], download=download)

    def __len__(self) -> int:
        return len(self._base)

    def _load(self, i: int) -> tuple[Tensor, int]:
        try:
            pil, _ = self._base[i]
            image = hwc_to_chw(np.asarray(pil.convert("RGB")))  # [3, 218, 178]
        except READ_ERRORS as exc:
            folder = Path(self._base.root) / self._base.base_folder / "img_align_celeba"
            raise DatasetError(f"celeba64: cannot read image '{self._base.filename[i]}' in the "
                               f"folder '{folder}' ({read_error_reason(exc)}); replace it (or "
                               "re-download CelebA)") from None
        return celeba_crop_resize(image, self.resolution), -1
