"""Fitting images to the dataset resolution: bilinear, Lanczos, and CelebA's centre crop."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from traflow_cli.data.images.transforms import hwc_to_chw

# CelebA-64 as in score_sde (Song et al. 2021), which the official Rectified Flow code reuses:
# the aligned 178x218 face is centre-cropped to 140x140, then resized with antialiasing.
CELEBA_ALIGNED_SIZE = (178, 218)  # (width, height)
CELEBA_CROP = 140


def resize_bilinear(image: Tensor, resolution: int) -> Tensor:
    """uint8 [C, H, W] -> uint8 [C, res, res], bilinear with antialiasing when shrinking."""
    out = torch.nn.functional.interpolate(
        image[None].float(), size=(resolution, resolution), mode="bilinear",
        antialias=True, align_corners=False,
    )
    return out[0].round().clamp(0, 255).to(torch.uint8)


def celeba_crop_resize(image: Tensor, resolution: int) -> Tensor:
    """Aligned CelebA face uint8 [C, 218, 178] -> centre 140x140 crop resized to [C, res, res]."""
    _, h, w = image.shape
    top, left = (h - CELEBA_CROP) // 2, (w - CELEBA_CROP) // 2  # 39, 19 for 218x178
    crop = image[:, top : top + CELEBA_CROP, left : left + CELEBA_CROP]
    return resize_bilinear(crop, resolution)


def downscale_lanczos(image: Tensor, resolution: int) -> Tensor:
    """uint8 [C, S, S] -> [C, res, res] with PIL Lanczos, as EDM's dataset_tool prepares FFHQ."""
    array = image.permute(1, 2, 0).numpy()
    pil = PIL.Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    small = pil.resize((resolution, resolution), PIL.Image.Resampling.LANCZOS)
    return hwc_to_chw(np.asarray(small).reshape(resolution, resolution, -1))
