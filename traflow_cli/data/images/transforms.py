"""Tensor layout and value conversions for uint8 images."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def hwc_to_chw(array: np.ndarray) -> Tensor:
    """numpy uint8 [H, W, C] -> torch uint8 [C, H, W], a contiguous writable copy."""
    # np.array always copies: CHW order, and writable even when PIL handed out read-only data.
    return torch.from_numpy(np.array(np.moveaxis(array, -1, 0), order="C"))


def to_model_range(images_uint8: Tensor) -> Tensor:
    """uint8 [B, C, H, W] in 0..255 -> float32 [B, C, H, W] in [-1, 1] (0 -> -1, 255 -> 1)."""
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def hflip_batch(images: Tensor, generator: torch.Generator) -> Tensor:
    """[B, C, H, W] -> same, each image mirrored left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(images.device).view(-1, *([1] * (images.ndim - 1)))
    return torch.where(flip, images.flip(-1), images)
