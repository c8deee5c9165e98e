"""Image datasets behind one interface: uint8 [C, H, W] images with integer labels (-1 if none).

Every dataset is a map-style torch Dataset. Images stay uint8 until `to_model_range` so that a
preloaded dataset costs one byte per pixel (CIFAR-10: 50k x 3x32x32 = 150 MB).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import Tensor
from torch.utils.data import Dataset

from traflow_cli.errors import UserError

IMAGE_DATASETS = ("cifar10", "celeba64", "ffhq64", "imagenet64", "folder", "shapes32")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")

# CelebA-64 as in score_sde (Song et al. 2021), which the official Rectified Flow code reuses:
# the aligned 178x218 face is centre-cropped to 140x140, then resized with antialiasing.
CELEBA_ALIGNED_SIZE = (178, 218)  # (width, height)
CELEBA_CROP = 140


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset that is not where we looked; its message is one line: where, and how to get it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


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


# ---- decoding -------------------------------------------------------------------------------

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_NEED_MORE = (-1, -1, -1)
_PIL_FORMATS = {
    ".png": ("PNG",), ".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".bmp": ("BMP",), ".webp": ("WEBP",),
    ".ppm": ("PPM",), ".pgm": ("PPM",), ".tif": ("TIFF",), ".tiff": ("TIFF",),
}


def _header_size(head: bytes) -> tuple[int, int, int] | None:
    """(width, height, channels 1|3) from the first bytes of a PNG or JPEG; _NEED_MORE; None."""
    # Parsing the size ourselves reads ~1 KB per image: PIL.Image.open costs ~40 us each, which
    # is what makes checking all sizes up front affordable for large zips.
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        if len(head) < 26 or head[12:16] != b"IHDR":
            return None
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        return w, h, 1 if head[25] in (0, 4) else 3  # colour types 0, 4: grey (+ alpha)
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in _JPEG_SOF:
            if i + 10 > len(head):
                return _NEED_MORE
            h = int.from_bytes(head[i + 5 : i + 7], "big")
            w = int.from_bytes(head[i + 7 : i + 9], "big")
            return w, h, 1 if head[i + 9] == 1 else 3
        else:
            i += 2 + int.from_bytes(head[i + 2 : i + 4], "big")
    return _NEED_MORE


def _decode(data: bytes, name: str, channels: int) -> np.ndarray:
    """Image bytes -> uint8 array [H, W, channels], decoded by PIL."""
    # PIL throughout, not torchvision.io (about 2x faster on small JPEGs, but deprecated since
    # torchvision 0.29): one decoder means lazy and preloaded reads give identical pixels.
    # Naming the format from the extension skips PIL's probing of every plugin (~15% faster).
    formats = _PIL_FORMATS.get(os.path.splitext(name)[1].lower())
    try:
        pil = PIL.Image.open(io.BytesIO(data), formats=formats)
    except PIL.UnidentifiedImageError:  # content that does not match its extension
        pil = PIL.Image.open(io.BytesIO(data))
    with pil:
        mode = "L" if channels == 1 else "RGB"
        array = np.asarray(pil if pil.mode == mode else pil.convert(mode))
    return array.reshape(array.shape[0], array.shape[1], channels)


def _hwc_to_chw(array: np.ndarray) -> Tensor:
    """numpy uint8 [H, W, C] -> torch uint8 [C, H, W], a contiguous writable copy."""
    # np.array always copies: CHW order, and writable even when PIL handed out read-only data.
    return torch.from_numpy(np.array(np.moveaxis(array, -1, 0), order="C"))


def celeba_crop_resize(image: Tensor, resolution: int) -> Tensor:
    """Aligned CelebA face uint8 [C, 218, 178] -> centre 140x140 crop resized to [C, res, res]."""
    _, h, w = image.shape
    top, left = (h - CELEBA_CROP) // 2, (w - CELEBA_CROP) // 2  # 39, 19 for 218x178
    crop = image[:, top : top + CELEBA_CROP, left : left + CELEBA_CROP]
    return _resize(crop, resolution)


def _resize(image: Tensor, resolution: int) -> Tensor:
    """uint8 [C, H, W] -> uint8 [C, res, res], bilinear with antialiasing when shrinking."""
    out = torch.nn.functional.interpolate(
        image[None].float(), size=(resolution, resolution), mode="bilinear",
        antialias=True, align_corners=False,
    )
    return out[0].round().clamp(0, 255).to(torch.uint8)


def _downscale_lanczos(image: Tensor, resolution: int) -> Tensor:
    """uint8 [C, S, S] -> [C, res, res] with PIL Lanczos, as EDM's dataset_tool prepares FFHQ."""
    array = image.permute(1, 2, 0).numpy()
    pil = PIL.Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    small = pil.resize((resolution, resolution), PIL.Image.Resampling.LANCZOS)
    return _hwc_to_chw(np.asarray(small).reshape(resolution, resolution, -1))


# ---- EDM / StyleGAN layout: a zip or folder of images with an optional dataset.json -----------


class EDMImageDataset(ImageDataset):
    """Images anywhere inside a zip or folder (EDM layout), labels from an optional dataset.json."""

    def __init__(
        self, path: str | Path, *, resolution: int, name: str = "folder", use_labels: bool = False,
        fit: str = "exact",
    ) -> None:
        """fit: "exact" (size must be resolution), "celeba" (crop 178x218 faces) or "downscale"."""
        super().__init__()
        if fit not in ("exact", "celeba", "downscale"):
            raise ValueError(f"{name}: unknown fit {fit!r}; expected exact, celeba or downscale")
        self.path, self.name, self.resolution, self.fit = Path(path), name, resolution, fit
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        self._is_zip = self.path.is_file()
        if self._is_zip and not zipfile.is_zipfile(self.path):
            raise ValueError(f"{name}: '{self.path}' is a file but not a zip archive")
        self._names = self._list_images()
        if not self._names:
            raise DatasetNotFoundError(
                f"{name}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in '{self.path}'"
            )
        self._source_size, self.channels = self._check_sizes()
        self._num_classes_hint = 0  # len(dataset.json "classes") when given
        self._label_list = self._read_labels() if use_labels else None
        self.num_classes = 0
        if self._label_list is not None:
            self.num_classes = max(self._num_classes_hint, max(self._label_list) + 1)

    # -- files --
    def _zipfile(self) -> zipfile.ZipFile:
        """The zip handle for this process, reopened after fork or unpickling."""
        # A handle inherited through fork shares its file offset with the parent, and handles do
        # not pickle, so each DataLoader worker opens its own on first use.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_zip"], state["_zip_pid"] = None, -1
        return state

    def _all_files(self) -> list[str]:
        """Every file path relative to the root, with '/' separators."""
        if self._is_zip:
            return [n for n in self._zipfile().namelist() if not n.endswith("/")]
        return [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]

    def _list_images(self) -> list[str]:
        """Image files in sorted order (the order labels and indices refer to)."""
        # Skip hidden files and macOS resource forks, which carry image extensions but no image.
        return sorted(
            f for f in self._all_files()
            if f.lower().endswith(IMAGE_EXTENSIONS)
            and not any(part.startswith(".") or part == "__MACOSX" for part in f.split("/"))
        )

    def _read(self, fname: str, limit: int = -1) -> bytes:
        """Bytes of one file (the first `limit` bytes when limit >= 0)."""
        if self._is_zip:
            with self._zipfile().open(fname) as f:
                return f.read(limit)
        with open(self.path / fname, "rb") as f:
            return f.read(limit)

    # -- sizes and labels --
    def _header(self, fname: str) -> tuple[int, int, int]:
        """(width, height, channels 1|3) of one image without decoding its pixels."""
        found = _header_size(self._read(fname, 2048))
        if found == _NEED_MORE:  # e.g. a JPEG with a large EXIF block before its frame header
            found = _header_size(self._read(fname))
        if found is None or found == _NEED_MORE:
            with PIL.Image.open(io.BytesIO(self._read(fname))) as pil:
                grey = pil.mode in ("1", "L", "LA", "I", "I;16", "F")
                return pil.size[0], pil.size[1], 1 if grey else 3
        return found

    def _check_sizes(self) -> tuple[tuple[int, int], int]:
        """Check all images share one size that fits `resolution`; (source (w, h), channels)."""
        first = self._names[0]
        w0, h0, c0 = self._header(first)
        channels = c0
        for fname in self._names[1:]:
            w, h, c = self._header(fname)
            if (w, h) != (w0, h0):
                raise ValueError(
                    f"{self.name}: images in '{self.path}' differ in size: '{first}' is {w0}x{h0} "
                    f"but '{fname}' is {w}x{h}; resize them all to one size first"
                )
            channels = max(channels, c)  # grey only when every image is grey
        res = self.resolution
        fits = {
            "exact": (w0, h0) == (res, res),
            "celeba": (w0, h0) in ((res, res), CELEBA_ALIGNED_SIZE),
            "downscale": w0 == h0 >= res,
        }[self.fit]
        if not fits:
            hint = (f"pass --set data.resolution={w0}" if w0 == h0 and self.fit == "exact"
                    else f"prepare them as {res}x{res} (e.g. EDM dataset_tool.py --resolution)")
            raise ValueError(
                f"{self.name}: images in '{self.path}' are {w0}x{h0} but data.resolution={res}; "
                f"{hint}"
            )
        return (w0, h0), channels

    def _read_labels(self) -> list[int]:
        """Integer label per image from dataset.json {"labels": [[path, class], ...]}."""
        where = f"'{self.path}{'!' if self._is_zip else os.sep}dataset.json'"
        try:
            meta = json.loads(self._read("dataset.json"))
        except (KeyError, FileNotFoundError):
            raise ValueError(
                f"{self.name}: data.use_labels=true but {where} does not exist; "
                "add one or set data.use_labels=false"
            ) from None
        entries = meta.get("labels") if isinstance(meta, dict) else None
        if not entries:
            raise ValueError(f"{self.name}: {where} holds no labels; set data.use_labels=false")
        classes = meta.get("classes")
        self._num_classes_hint = len(classes) if isinstance(classes, list) else 0
        by_name = {str(p).replace("\\", "/"): c for p, c in entries}
        missing = [f for f in self._names if f not in by_name]
        if missing:
            raise ValueError(f"{self.name}: {where} has no label for '{missing[0]}' "
                             f"({len(missing)} images unlabelled)")
        labels = [by_name[f] for f in self._names]
        bad = next((x for x in labels if not isinstance(x, int) or x < 0), None)
        if bad is not None:
            raise ValueError(f"{self.name}: {where} has label {bad!r}; expected class indices >= 0")
        return labels

    # -- items --
    def __len__(self) -> int:
        return len(self._names)

    def _pixels(self, i: int) -> np.ndarray:
        """Image i as uint8 [res, res, C], decoded and fitted to the resolution."""
        fname = self._names[i]
        array = _decode(self._read(fname), fname, self.channels)  # [H, W, C]
        w0, h0 = self._source_size
        if array.shape[:2] != (h0, w0):  # the header lied; never hand on a wrong shape
            raise ValueError(f"{self.name}: '{fname}' decodes to {array.shape[1]}x{array.shape[0]}"
                             f" but its header and the first image say {w0}x{h0}")
        if (w0, h0) == (self.resolution, self.resolution):
            return array
        image = _hwc_to_chw(array)
        if self.fit == "celeba":
            image = celeba_crop_resize(image, self.resolution)
        else:
            image = _downscale_lanczos(image, self.resolution)
        return image.permute(1, 2, 0).numpy()

    def _label(self, i: int) -> int:
        return self._label_list[i] if self._label_list is not None else -1

    def _load(self, i: int) -> tuple[Tensor, int]:
        return _hwc_to_chw(self._pixels(i)), self._label(i)

    def _load_all(self) -> tuple[Tensor, Tensor]:
        # Filling one numpy HWC array and transposing once at the end is ~25% faster than
        # assigning 50k small CHW tensors (torch indexing costs ~20 us per call).
        n, res, c = len(self), self.resolution, self.channels
        pixels = np.empty((n, res, res, c), dtype=np.uint8)
        for i in range(n):
            pixels[i] = self._pixels(i)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # [N, C, H, W]
        labels = torch.tensor([self._label(i) for i in range(n)], dtype=torch.int64)
        return images, labels

    @property
    def files(self) -> list[str]:
        """Image paths relative to the root, in item order."""
        return list(self._names)


# ---- torchvision-backed datasets ----------------------------------------------------------------


def _cifar10_torchvision(root: Path, train: bool, download: bool, use_labels: bool,
                         resolution: int = 32) -> ImageDataset:
    """CIFAR-10 through torchvision (root holds cifar-10-batches-py), kept in memory."""
    from torchvision.datasets import CIFAR10

    base = CIFAR10(str(root), train=train, download=download)
    images = torch.from_numpy(np.ascontiguousarray(base.data)).permute(0, 3, 1, 2).contiguous()
    if resolution != 32:  # the same Lanczos filter as a downscaled zip, image by image
        images = torch.stack([_downscale_lanczos(image, resolution) for image in images])
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
        pil, _ = self._base[i]
        image = _hwc_to_chw(np.asarray(pil.convert("RGB")))  # [3, 218, 178]
        return celeba_crop_resize(image, self.resolution), -1


# ---- entry points -------------------------------------------------------------------------------


def default_data_root() -> Path:
    """Where datasets live when no path is given: $TRAFLOW_DATA or ~/.cache/traflow/data."""
    return Path(os.environ.get("TRAFLOW_DATA", "~/.cache/traflow/data")).expanduser()


def _is_edm_source(path: Path) -> bool:
    """Whether path is a zip, or a folder holding images or a dataset.json (EDM layout)."""
    if path.is_file():
        return zipfile.is_zipfile(path)
    if not path.is_dir():
        return False
    if (path / "dataset.json").is_file():
        return True
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*"))


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
        from traflow_cli.data.shapes import ShapesDataset

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
                return _cifar10_torchvision(root, train, download, use_labels, resolution)
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

    if name in ("ffhq64", "imagenet64"):
        _require_resolution(name, resolution, 64)
        if name == "ffhq64" and use_labels:
            raise ValueError("ffhq64: has no class labels; set data.use_labels=false")
        if root is None or not _is_edm_source(root):
            tool = ("--resolution=64x64" if name == "ffhq64"
                    else "--transform=center-crop --resolution=64x64")
            where = f"no dataset at '{root}'" if root is not None else "no data.path given"
            raise DatasetNotFoundError(
                f"{name}: {where} (looked for an EDM-style zip/folder); prepare one with EDM's "
                f"dataset_tool.py {tool} and pass --set data.path=..."
            )
        fit = "downscale" if name == "ffhq64" else "exact"  # FFHQ thumbnails/1024px are square
        return EDMImageDataset(root, resolution=resolution, name=name, use_labels=use_labels,
                               fit=fit)

    if name == "folder":
        if root is None or not _is_edm_source(root):
            raise _not_found(name, root, "a zip or folder of images, optionally with dataset.json",
                             online=False)
        return EDMImageDataset(root, resolution=resolution, name=name, use_labels=use_labels)

    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(IMAGE_DATASETS)}")


def to_model_range(images_uint8: Tensor) -> Tensor:
    """uint8 [B, C, H, W] in 0..255 -> float32 [B, C, H, W] in [-1, 1] (0 -> -1, 255 -> 1)."""
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def hflip_batch(images: Tensor, generator: torch.Generator) -> Tensor:
    """[B, C, H, W] -> same, each image mirrored left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(images.device).view(-1, *([1] * (images.ndim - 1)))
    return torch.where(flip, images.flip(-1), images)
