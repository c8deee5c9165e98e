"""Writing samples: PNG files, npz archives, image grids and 2-D scatter pictures."""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from traflow_cli.engine.records import atomic_write_bytes


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8, rounding as EDM's writer does."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def sample_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def _write_png(path: Path, pixels: np.ndarray) -> None:
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    tmp = path.with_name(f".{path.name}.tmp")
    # Level 1: PNG stays lossless; higher levels cost several times more CPU for ~10% smaller files.
    image.save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)  # a file that exists is complete, so a resumed run may trust it


class PNGWriter:
    """Writes PNGs on a few threads (zlib releases the GIL) while the network runs."""

    def __init__(self, folder: Path, threads: int = 2) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=threads)
        self._pending: list = []

    def write(self, indices: list[int], pixels: np.ndarray) -> None:
        for index, image in zip(indices, pixels, strict=False):
            self._pending.append(self._pool.submit(_write_png, sample_path(self.folder, index),
                                                   image))
        if len(self._pending) > 4096:
            self.flush()

    def flush(self) -> None:
        for future in self._pending:
            future.result()
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        self._pool.shutdown()


def missing_indices(folder: Path, count: int) -> list[int]:
    """Sample indices in [0, count) without a finished PNG (what a resumed run must make)."""
    return [i for i in range(count) if not sample_path(folder, i).is_file()]


def read_pngs(folder: Path, count: int) -> np.ndarray:
    """[count, H, W, C] uint8 from the first `count` sample PNGs."""
    return np.stack([np.asarray(Image.open(sample_path(folder, i)).convert("RGB"))
                     for i in range(count)])


def image_grid(pixels: np.ndarray, columns: int = 8) -> Image.Image:
    """Tile [B, H, W, C] uint8 images into one picture, `columns` wide."""
    b, h, w, c = pixels.shape
    rows = math.ceil(b / columns)
    canvas = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, col = divmod(i, columns)
        canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def save_image(path: Path, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def scatter_panel(points: Tensor, title: str, *, size: int = 256, extent: float = 3.5
                  ) -> Image.Image:
    """A density picture of 2-D points [n, 2] over [-extent, extent]^2, with a title."""
    p = points.detach().float().cpu().clamp(-extent, extent)
    hist = torch.histogramdd(p, bins=[size, size],
                             range=[-extent, extent, -extent, extent]).hist
    # Log scale so sparse tails stay visible next to dense modes; y axis points up.
    density = torch.log1p(hist).T.flip(0)
    density = (255 * (1 - density / density.max().clamp(min=1e-9))).to(torch.uint8).numpy()
    panel = Image.new("L", (size, size + 18), 255)
    panel.paste(Image.fromarray(density), (0, 18))
    ImageDraw.Draw(panel).text((4, 3), title, fill=0)
    return panel


def panels_row(panels: list[Image.Image]) -> Image.Image:
    width = sum(p.width for p in panels) + 4 * (len(panels) - 1)
    out = Image.new("L", (width, max(p.height for p in panels)), 200)
    x = 0
    for panel in panels:
        out.paste(panel, (x, 0))
        x += panel.width + 4
    return out
