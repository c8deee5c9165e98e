"""EDM / StyleGAN layout: images anywhere inside a zip or folder, labels in an optional dataset.json.

Every image's header is read when the dataset opens (~1 KB each), so a file that is not an image,
is empty or cannot be read, or a size that does not fit, fails the run in its first second. A
file whose header is sound but whose pixels are cut short or corrupt fails when it is first
decoded: at open with preload, else when first drawn. Either way the error is one line naming
the file and its zip or folder.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from traflow_cli.data.images.dataset import ImageDataset
from traflow_cli.data.images.decode import READ_ERRORS, decode_image, probe_image, read_error_reason
from traflow_cli.data.images.errors import DatasetError, DatasetNotFoundError
from traflow_cli.data.images.files import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_FILE_BYTES,
    MAX_IMAGE_PIXELS,
    folder_image_names,
    image_names,
)
from traflow_cli.data.images.header import NEED_MORE, size_from_header
from traflow_cli.data.images.resize import CELEBA_ALIGNED_SIZE, celeba_crop_resize, downscale_lanczos
from traflow_cli.data.images.transforms import hwc_to_chw
from traflow_cli.errors import one_line
from traflow_cli.untrusted import check_zip_member, parse_json, read_regular, read_zip_member

FITS = ("exact", "celeba", "downscale")
#: dataset.json's allowance beyond 1 KB an image (its "classes" list, if any).
MAX_LABELS_BYTES = 16 << 20


class EDMImageDataset(ImageDataset):
    """Images anywhere inside a zip or folder (EDM layout), labels from an optional dataset.json."""

    def __init__(
        self, path: str | Path, *, resolution: int, name: str = "folder", use_labels: bool = False,
        fit: str = "exact",
    ) -> None:
        """fit: "exact" (size must be resolution), "celeba" (crop 178x218 faces) or "downscale"."""
        super().__init__()
        if fit not in FITS:
            raise ValueError(f"{name}: unknown fit {fit!r}; expected exact, celeba or downscale")
        self.path, self.name, self.resolution, self.fit = Path(path), name, resolution, fit
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        self._is_zip = self.path.is_file()
        if self._is_zip and not zipfile.is_zipfile(self.path):
            raise DatasetError(f"{name}: '{self.path}' is a file but not a zip archive")
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
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (OSError, zipfile.BadZipFile) as exc:
                raise DatasetError(f"{self.name}: cannot open the zip '{self.path}' "
                                   f"({one_line(exc)}); re-create or re-download it") from None
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_zip"], state["_zip_pid"] = None, -1
        return state

    def _list_images(self) -> list[str]:
        """Image files in sorted order (the order labels and indices refer to)."""
        if self._is_zip:
            zf = self._zipfile()
            names = image_names(zf.namelist())
            for name in names:  # sizes from the zip's directory: no member is inflated yet
                try:
                    check_zip_member(zf.getinfo(name), MAX_IMAGE_FILE_BYTES)
                except ValueError as exc:
                    raise self._unreadable(name, str(exc)) from None
            return names
        try:
            return folder_image_names(self.path)
        except OSError as exc:
            raise DatasetError(f"{self.name}: cannot list the folder '{self.path}' "
                               f"({read_error_reason(exc)})") from None

    def _read(self, fname: str, limit: int = -1, max_bytes: int = MAX_IMAGE_FILE_BYTES) -> bytes:
        """Bytes of one file (the first `limit` bytes when limit >= 0); raises READ_ERRORS.

        Never more than `max_bytes`: a zip member is checked before it is inflated (a bomb), and
        a folder's file must be a regular file (a link to /dev/zero or a pipe would never end).
        """
        if self._is_zip:
            return read_zip_member(self._zipfile(), fname, limit, max_bytes=max_bytes)
        return read_regular(self.path / fname, limit, max_bytes=max_bytes)

    def _unreadable(self, fname: str, reason: str) -> DatasetError:
        """The one-line error for an image that cannot be read: which file, in which zip/folder."""
        where = "zip" if self._is_zip else "folder"
        return DatasetError(f"{self.name}: cannot read image '{fname}' in the {where} "
                            f"'{self.path}' ({reason}); replace or remove that file")

    # -- sizes and labels --
    def _header(self, fname: str) -> tuple[int, int, int]:
        """(width, height, channels 1|3) of one image without decoding its pixels."""
        try:
            head = self._read(fname, 2048)
            found = size_from_header(head)
            if found == NEED_MORE:  # e.g. a JPEG with a large EXIF block before its frame header
                found = size_from_header(self._read(fname))
            if head and found in (None, NEED_MORE):  # another format, or not an image: ask PIL
                found = probe_image(self._read(fname))
        except DatasetError:
            raise
        except READ_ERRORS as exc:
            raise self._unreadable(fname, read_error_reason(exc)) from None
        if not head:
            raise self._unreadable(fname, "the file is empty")
        return found

    def _check_sizes(self) -> tuple[tuple[int, int], int]:
        """Check all images share one size that fits `resolution`; (source (w, h), channels)."""
        first = self._names[0]
        w0, h0, c0 = self._header(first)
        channels = c0
        for fname in self._names[1:]:
            w, h, c = self._header(fname)
            if (w, h) != (w0, h0):
                raise DatasetError(
                    f"{self.name}: images in '{self.path}' differ in size: '{first}' is {w0}x{h0} "
                    f"but '{fname}' is {w}x{h}; resize them all to one size first"
                )
            channels = max(channels, c)  # grey only when every image is grey
        if w0 * h0 > MAX_IMAGE_PIXELS:
            raise DatasetError(
                f"{self.name}: images in '{self.path}' are {w0}x{h0}, more than the "
                f"{MAX_IMAGE_PIXELS:,} pixels an image may have; downscale them first (e.g. EDM "
                "dataset_tool.py --resolution)")
        res = self.resolution
        fits = {
            "exact": (w0, h0) == (res, res),
            "celeba": (w0, h0) in ((res, res), CELEBA_ALIGNED_SIZE),
            "downscale": w0 == h0 >= res,
        }[self.fit]
        if not fits:
            hint = (f"pass --set data.resolution={w0}" if w0 == h0 and self.fit == "exact"
                    else f"prepare them as {res}x{res} (e.g. EDM dataset_tool.py --resolution)")
            raise DatasetError(
                f"{self.name}: images in '{self.path}' are {w0}x{h0} but data.resolution={res}; "
                f"{hint}"
            )
        return (w0, h0), channels

    def _read_labels(self) -> list[int]:
        """Integer label per image from dataset.json {"labels": [[path, class], ...]}."""
        where = f"'{self.path}{'!' if self._is_zip else os.sep}dataset.json'"
        try:
            # [path, class] pairs need ~100 bytes an image: a larger file is not a label list.
            meta = parse_json(self._read("dataset.json", max_bytes=MAX_LABELS_BYTES + 1024 * len(
                self._names)))
        except DatasetError:
            raise
        except (KeyError, FileNotFoundError):
            raise DatasetError(
                f"{self.name}: data.use_labels=true but {where} does not exist; "
                "add one or set data.use_labels=false"
            ) from None
        except READ_ERRORS as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DatasetError(f"{self.name}: cannot read {where} ({one_line(exc)}); fix it or "
                               "set data.use_labels=false") from None
        entries = meta.get("labels") if isinstance(meta, dict) else None
        if not entries:
            raise DatasetError(f"{self.name}: {where} holds no labels; set data.use_labels=false")
        classes = meta.get("classes")
        self._num_classes_hint = len(classes) if isinstance(classes, list) else 0
        try:
            by_name = {str(p).replace("\\", "/"): c for p, c in entries}
        except (TypeError, ValueError):
            raise DatasetError(f"{self.name}: {where} has labels that are not [path, class] "
                               "pairs; fix it or set data.use_labels=false") from None
        missing = [f for f in self._names if f not in by_name]
        if missing:
            raise DatasetError(f"{self.name}: {where} has no label for '{missing[0]}' "
                               f"({len(missing)} images unlabelled)")
        labels = [by_name[f] for f in self._names]
        bad = next((x for x in labels if not isinstance(x, int) or x < 0), None)
        if bad is not None:
            raise DatasetError(f"{self.name}: {where} has label {bad!r}; expected class indices "
                               ">= 0")
        return labels

    # -- items --
    def __len__(self) -> int:
        return len(self._names)

    def _pixels(self, i: int) -> np.ndarray:
        """Image i as uint8 [res, res, C], decoded and fitted to the resolution."""
        fname = self._names[i]
        try:
            array = decode_image(self._read(fname), fname, self.channels)  # [H, W, C]
        except DatasetError:
            raise
        except READ_ERRORS as exc:
            raise self._unreadable(fname, read_error_reason(exc)) from None
        w0, h0 = self._source_size
        if array.shape[:2] != (h0, w0):  # the header lied; never hand on a wrong shape
            raise self._unreadable(fname, f"it decodes to {array.shape[1]}x{array.shape[0]} but "
                                   f"its header and the first image say {w0}x{h0}")
        if (w0, h0) == (self.resolution, self.resolution):
            return array
        image = hwc_to_chw(array)
        if self.fit == "celeba":
            image = celeba_crop_resize(image, self.resolution)
        else:
            image = downscale_lanczos(image, self.resolution)
        return image.permute(1, 2, 0).numpy()

    def _label(self, i: int) -> int:
        return self._label_list[i] if self._label_list is not None else -1

    def _load(self, i: int) -> tuple[Tensor, int]:
        return hwc_to_chw(self._pixels(i)), self._label(i)

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
