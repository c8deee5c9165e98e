"""Writing samples: PNG files, npz archives, image grids and 2-D scatter pictures."""

from __future__ import annotations

import contextlib
import io
import math
import os
import zipfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from traflow_cli.data.images.header import PNG_SIGNATURE
from traflow_cli.engine.records import atomic_write_bytes, replaced_on_success


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8, rounding as EDM's writer does."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def sample_path(folder: Path, index: int) -> Path:
    """Where sample `index` lives: folder/000042.png (six digits, more past 999,999)."""
    return folder / f"{index:06d}.png"


def encode_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    """One [H, W, C] uint8 image (C = 1 or 3) as lossless PNG bytes."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    # Level 1: still lossless; higher levels cost 2x the CPU for ~1% smaller CIFAR files
    # (benchmarks/test_bench_writing.py).
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def write_png(path: Path, pixels: np.ndarray, compress_level: int = 1) -> None:
    """Write one PNG under a temporary name, then rename: only a file written to its last byte
    gets its name (a short write is retried, a full disk is a one-line WriteError and leaves no
    file). Not fsynced one by one (~3 ms each: 50k samples would wait minutes); a resumed run
    checks what it finds instead (`incomplete_pngs`), so a crash never leaves a cut file trusted.
    """
    # ".NAME.tmp": the name remove_partial sweeps when a crash leaves one behind.
    atomic_write_bytes(path, encode_png(pixels, compress_level), durable=False, tmp_suffix=".tmp",
                       make_folder=False)


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every whole PNG ends with
MAX_PNG_BYTES = 1 << 30  # no sample PNG is larger (a 4096x4096 RGB one is at most ~50 MB)


def png_is_complete(path: Path) -> bool:
    """Whether a PNG file is whole: the signature, then chunks whose lengths and CRCs hold, up
    to IEND at the file's last byte (a write cut short by a full disk or a crash fails this)."""
    try:  # os.open/os.read: half the cost of Path.read_bytes, for the ~50k files of a resume
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a pipe never blocks
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size + 1) if size <= MAX_PNG_BYTES else b""
        finally:
            os.close(fd)
    except OSError:
        return False
    if data[:8] != PNG_SIGNATURE or not data.endswith(_PNG_END):
        return False
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            return False
        kind = data[pos + 4:pos + 8]
        if zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return False
        if kind == b"IEND":
            return end == len(data)
        pos = end
    return False


def incomplete_pngs(folder: Path, indices: Iterable[int]) -> list[int]:
    """The indices among `indices` whose sample PNG in folder is not whole (see png_is_complete)."""
    return [i for i in indices if not png_is_complete(sample_path(folder, i))]


class PNGWriter:
    """Writes sample PNGs on a few threads (zlib and file I/O release the GIL) while the
    network makes the next batch; at most `max_pending` images wait in memory.

    threads=None: one per CPU core, up to 8 (a fast 1-step student on a GPU outruns 2 threads).
    """

    def __init__(self, folder: Path, *, threads: int | None = None, compress_level: int = 1,
                 max_pending: int = 8192) -> None:
        threads = threads or min(8, os.cpu_count() or 1)
        self.folder = folder
        self.compress_level = compress_level
        self.max_pending = max_pending
        folder.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png")
        self._pending: deque[Future] = deque()

    def write(self, indices: Sequence[int], pixels: np.ndarray) -> None:
        """Queue sample indices[b] = pixels[b] ([B, H, W, C] uint8); raises a failed earlier write."""
        for index, image in zip(indices, pixels, strict=True):
            self._pending.append(self._pool.submit(
                write_png, sample_path(self.folder, index), image, self.compress_level))
        while len(self._pending) > self.max_pending:
            self._pending.popleft().result()

    def flush(self) -> None:
        """Wait until every queued PNG is on disk."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PNGWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def existing_indices(folder: Path) -> set[int]:
    """Indices of the finished sample PNGs in folder (one directory listing, not N stats)."""
    if not folder.is_dir():
        return set()
    found = set()
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.partition(".")
            if dot and ext == "png" and stem.isdigit():
                found.add(int(stem))
    return found


def remove_partial(folder: Path) -> int:
    """Delete the .tmp files that writes cut short by a crash left behind; returns how many."""
    if not folder.is_dir():
        return 0
    stale = list(folder.glob(".*.png.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def missing_indices(folder: Path, count: int) -> list[int]:
    """Sample indices in [0, count) without a finished PNG (what a resumed run must make)."""
    done = existing_indices(folder)
    return [i for i in range(count) if i not in done]


def read_png(folder: Path, index: int) -> np.ndarray:
    """[H, W, C] uint8 of one sample PNG (C = 1 or 3, as written)."""
    with Image.open(sample_path(folder, index)) as image:
        pixels = np.asarray(image)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def read_pngs(folder: Path, count: int) -> np.ndarray:
    """[count, H, W, C] uint8 from the first `count` sample PNGs (C = 1 or 3, as written)."""
    return np.stack([read_png(folder, i) for i in range(count)])


def png_rows(folder: Path, count: int, chunk: int = 256) -> Iterator[np.ndarray]:
    """The first `count` sample PNGs as [<= chunk, H, W, C] uint8 arrays, in index order."""
    for start in range(0, count, chunk):
        yield np.stack([read_png(folder, i) for i in range(start, min(count, start + chunk))])


@contextlib.contextmanager
def _durable_file(path: Path) -> Iterator[io.BufferedWriter]:
    """A handle on a temporary beside `path`, fsynced and renamed over it on a clean exit and
    removed on any error (records.replaced_on_success)."""
    with replaced_on_success(path, make_folder=False) as tmp, open(tmp, "wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write an uncompressed .npz durably (`_durable_file`), with no second copy of the arrays
    in memory, unlike saving to bytes first."""
    with _durable_file(path) as handle:
        np.savez(handle, **arrays)


def save_npz_rows(path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype,
                  rows: Iterator[np.ndarray], **small: np.ndarray) -> None:
    """Write an uncompressed .npz whose array `name` [shape] is filled from `rows` (chunks along
    axis 0, in order) as they come: memory holds one chunk, never the whole array, however many
    samples. np.load reads it as it reads np.savez's files; `small` arrays are stored whole.
    Written durably, as save_npz."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}
    with _durable_file(path) as handle:
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                filled = 0
                for chunk in rows:
                    chunk = np.ascontiguousarray(chunk, dtype=dtype)
                    member.write(chunk.tobytes())
                    filled += len(chunk)
                if filled != shape[0]:
                    raise ValueError(f"{path}: {filled} rows given for {shape[0]}")
            for key, array in small.items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


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
