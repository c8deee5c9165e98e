"""shapes32: coloured circles, squares and triangles drawn on the fly, so images need no download.

Image i depends on i alone: its 13 parameters come from a torch.Generator seeded with i, and
drawing uses only exactly-rounded elementwise ops (no exp/sin, whose vectorised and scalar
kernels may differ by an ulp), so a batch of any size or order reproduces each image bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from traflow_cli.data.images.dataset import ImageDataset

SHAPE_NAMES = ("circle", "square", "triangle")  # label = index in this tuple
NUM_PARAMS = 13
_CHUNK = 256  # images drawn at once: small buffers stay in cache and skip page faults
_COS30 = 3**0.5 / 2


def shape_params(indices: Tensor | Sequence[int]) -> Tensor:
    """Uniform parameters [N, 13] float32, row k from a generator seeded by indices[k] alone."""
    rows = []
    for i in torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist():
        if i < 0:
            raise IndexError(f"shapes32: image index {i} is negative")
        generator = torch.Generator().manual_seed(i)
        rows.append(torch.rand(NUM_PARAMS, generator=generator))
    return torch.stack(rows) if rows else torch.empty(0, NUM_PARAMS)


def shape_labels(params: Tensor) -> Tensor:
    """Shape type [N] int64 (0 circle, 1 square, 2 triangle) from parameters [N, 13]."""
    return (params[:, 0] * len(SHAPE_NAMES)).floor().clamp(max=len(SHAPE_NAMES) - 1).long()


def render_shapes(params: Tensor, resolution: int = 32) -> Tensor:
    """Parameters [N, 13] -> uint8 [N, 3, res, res]: one antialiased shape on a background."""
    u, res = params.to(torch.float32), float(resolution)
    kind = shape_labels(u)  # [N]
    # Size: a circle radius of 16-32% of the side; square and triangle get about the same area
    # (half side 0.886 r, inradius 0.777 r) so the shape type is not given away by its size.
    radius = res * (0.16 + 0.16 * u[:, 1])
    half = 0.886 * radius
    inradius = 0.777 * radius
    # Extent from the centre: (half width, up, down); 1 px margin keeps the soft edge inside.
    ext_x = torch.stack([radius, half, 2 * _COS30 * inradius], dim=1).gather(1, kind[:, None])[:, 0]
    ext_up = torch.stack([radius, half, 2 * inradius], dim=1).gather(1, kind[:, None])[:, 0]
    ext_down = torch.stack([radius, half, inradius], dim=1).gather(1, kind[:, None])[:, 0]
    cx = (ext_x + 1) + u[:, 2] * (res - 2 * (ext_x + 1))
    cy = (ext_up + 1) + u[:, 3] * (res - (ext_up + 1) - (ext_down + 1))

    grid = torch.arange(resolution, dtype=torch.float32) + 0.5  # pixel centres
    dx = grid.view(1, 1, -1) - cx.view(-1, 1, 1)  # [N, 1, W] -> broadcasts to [N, H, W]
    dy = grid.view(1, -1, 1) - cy.view(-1, 1, 1)  # [N, H, 1]
    # Signed distance in pixels (negative inside); the triangle points up (image y runs down)
    # and is the intersection of three half-planes at its inradius from the centre.
    sd_circle = (dx * dx + dy * dy).sqrt() - radius.view(-1, 1, 1)
    sd_square = torch.maximum(dx.abs(), dy.abs()) - half.view(-1, 1, 1)
    sd_triangle = torch.maximum(
        torch.maximum(dy, _COS30 * dx - 0.5 * dy), -_COS30 * dx - 0.5 * dy
    ) - inradius.view(-1, 1, 1)
    k = kind.view(-1, 1, 1)
    sdf = torch.where(k == 0, sd_circle, torch.where(k == 1, sd_square, sd_triangle))  # [N, H, W]
    coverage = (0.5 - sdf).clamp(0, 1)[:, None]  # [N, 1, H, W]: a one-pixel antialiased edge

    # Background: colour c0, half the images with a +-0.2 brightness ramp across x or y.
    c0 = u[:, 4:7].view(-1, 3, 1, 1)
    ramp = 0.4 * (u[:, 9] - 0.5) * (u[:, 7] < 0.5)  # [N]; zero for plain backgrounds
    along_x = (u[:, 8] < 0.5).view(-1, 1, 1)
    t = torch.where(along_x, grid.view(1, 1, -1) / res, grid.view(1, -1, 1) / res)  # [N, H, W]
    background = (c0 + ramp.view(-1, 1, 1, 1) * t[:, None]).clamp(0, 1)  # [N, 3, H, W]
    # Shape colour: every channel 0.3-0.7 away from c0 (circularly), so it always stands out.
    foreground = torch.remainder(u[:, 4:7] + 0.3 + 0.4 * u[:, 10:13], 1.0).view(-1, 3, 1, 1)
    image = background + (foreground - background) * coverage  # [N, 3, H, W] in [0, 1]
    return (image * 255).round().clamp(0, 255).to(torch.uint8)


def draw_shapes(indices: Tensor | Sequence[int], resolution: int = 32) -> tuple[Tensor, Tensor]:
    """Images [N, 3, res, res] uint8 and shape labels [N] int64 for absolute image indices."""
    params = shape_params(indices)
    images = [render_shapes(p, resolution) for p in params.split(_CHUNK)]
    if not images:
        return torch.empty(0, 3, resolution, resolution, dtype=torch.uint8), shape_labels(params)
    return torch.cat(images), shape_labels(params)


class ShapesDataset(ImageDataset):
    """shapes32: `size` procedurally drawn images [3, res, res], labels = shape type if asked."""

    def __init__(
        self, size: int = 50_000, *, resolution: int = 32, use_labels: bool = False,
        offset: int = 0,
    ) -> None:
        """offset shifts which images are drawn: item i is image offset + i (held-out splits)."""
        super().__init__()
        if size <= 0 or resolution < 8 or offset < 0:
            raise ValueError(f"shapes32: need size > 0, resolution >= 8, offset >= 0; got "
                             f"size={size}, resolution={resolution}, offset={offset}")
        self.name, self.size, self.offset, self.use_labels = "shapes32", size, offset, use_labels
        self.resolution, self.channels = resolution, 3
        self.num_classes = len(SHAPE_NAMES) if use_labels else 0

    def __len__(self) -> int:
        return self.size

    def _draw(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Items [B] -> images [B, 3, res, res] uint8 and labels [B] (-1 when unlabelled)."""
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.size):
            raise IndexError(f"shapes32: index out of range for {self.size} images")
        images, labels = draw_shapes(index + self.offset, self.resolution)
        return images, labels if self.use_labels else torch.full_like(labels, -1)

    def _load(self, i: int) -> tuple[Tensor, int]:
        images, labels = self._draw(torch.tensor([i]))
        return images[0], int(labels[0])

    def _load_all(self) -> tuple[Tensor, Tensor]:
        return self._draw(torch.arange(self.size))

    def get_batch(self, indices: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Images [B, 3, res, res] uint8 and labels [B]; drawn in one vectorised pass if needed."""
        if self.preloaded:
            return super().get_batch(indices)
        return self._draw(torch.as_tensor(indices, dtype=torch.int64).reshape(-1))
