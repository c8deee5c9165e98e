"""The one interface every image dataset keeps: uint8 [C, H, W] images with integer labels.

Every dataset is a map-style torch Dataset. Images stay uint8 until `to_model_range` so that a
preloaded dataset costs one byte per pixel (CIFAR-10: 50k x 3x32x32 = 150 MB).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset


class ImageDataset(Dataset[tuple[Tensor, int]]):
    """Map-style dataset of uint8 images [C, H, W] with an int label (-1 when unlabelled)."""

    name: str = "images"
    resolution: int
    channels: int
    num_classes: int  # 0 when unconditional

    def __init__(self) -> None:
        self._images: Tensor | None = None  # [N, C, H, W] uint8 once preloaded
        self._labels: Tensor | None = None  # [N] int64 once preloaded

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, i: int) -> tuple[Tensor, int]:
        """Decode item i without the preload cache: uint8 [C, H, W] and its label."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """Item i as (uint8 [C, H, W], label)."""
        n, i = len(self), int(i)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for {n} images")
        i = i % n
        if self._images is not None and self._labels is not None:
            return self._images[i], int(self._labels[i])
        return self._load(i)

    @property
    def preloaded(self) -> bool:
        """Whether every image already sits in one uint8 tensor."""
        return self._images is not None

    def preload(self) -> ImageDataset:
        """Decode every image once into one uint8 tensor [N, C, H, W]; returns self."""
        if self._images is None:
            self._images, self._labels = self._load_all()
        return self

    def _load_all(self) -> tuple[Tensor, Tensor]:
        """All images [N, C, H, W] uint8 and labels [N] int64 (subclasses may do this faster)."""
        n, shape = len(self), (self.channels, self.resolution, self.resolution)
        images = torch.empty((n, *shape), dtype=torch.uint8)
        labels = torch.empty(n, dtype=torch.int64)
        for i in range(n):  # filled in place: no second copy of the whole set while stacking
            images[i], labels[i] = self._load(i)
        return images, labels

    def get_batch(self, indices: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Images [B, C, H, W] uint8 and labels [B] int64 for the given item indices."""
        index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if self._images is not None and self._labels is not None:
            return self._images[index], self._labels[index]
        items = [self[int(i)] for i in index]
        if not items:
            shape = (0, self.channels, self.resolution, self.resolution)
            return torch.empty(shape, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items],
                                                                dtype=torch.int64)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, len={len(self)}, "
            f"shape={self.channels}x{self.resolution}x{self.resolution}, "
            f"num_classes={self.num_classes}, preloaded={self.preloaded})"
        )


class TensorImageDataset(ImageDataset):
    """Images already in memory: uint8 [N, C, H, W] plus optional labels [N]."""

    def __init__(
        self, images: Tensor, labels: Tensor | None = None, *, num_classes: int = 0,
        name: str = "tensor",
    ) -> None:
        super().__init__()
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"{name}: expected square uint8 images [N, C, H, W], got "
                             f"{images.dtype} {tuple(images.shape)}")
        self.name = name
        self.channels, self.resolution = int(images.shape[1]), int(images.shape[-1])
        self.num_classes = num_classes if labels is not None else 0
        self._size = len(images)
        self._images = images  # always "preloaded": __getitem__ never reaches _load
        self._labels = (labels.to(torch.int64) if labels is not None
                        else torch.full((len(images),), -1, dtype=torch.int64))

    def __len__(self) -> int:
        return self._size
