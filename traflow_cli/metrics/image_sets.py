"""The images an FID measures: a folder, zip or npz, listed and size-checked without decoding.

The folder and zip listing is the datasets' own (`traflow_cli.data.images.files`), so FID and
training agree on what counts as an image. A file that cannot be read is named, with its folder
or zip, in a one-line FIDError.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from traflow_cli.data.images.decode import READ_ERRORS, decode_image, read_error_reason
from traflow_cli.data.images.files import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_FILE_BYTES,
    MAX_IMAGE_PIXELS,
    folder_image_names,
    image_names,
)
from traflow_cli.errors import FIDError, one_line
from traflow_cli.untrusted import (
    check_zip_member,
    load_npz,
    npz_names,
    open_regular,
    read_regular,
    read_zip_member,
)

#: Keys tried, in order, for the image array in a samples ``.npz``. "arr_0" is what
#: ``np.savez(path, images)`` writes, the convention of most sampling scripts.
NPZ_IMAGE_KEYS = ("images", "samples", "arr_0")


@dataclass
class ImageSet:
    """A validated collection of equally sized images.

    Attributes:
        kind: "folder", "zip" or "npz".
        path: the folder, zip or npz file.
        files: image paths (folder) or member names (zip); empty for npz.
        array: (N, H, W, 3) uint8 images for npz, else None.
        size: (H, W) shared by every image.
        what: "samples" or "reference images" (what they are to the FID, for messages).
    """

    kind: str
    path: Path
    files: list[str]
    array: np.ndarray | None
    size: tuple[int, int]
    what: str = "samples"

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.files)

    def name_of(self, file: str) -> str:
        """A file of ``files`` as the user knows it: relative to the folder, or the zip member."""
        return os.path.relpath(file, self.path) if self.kind == "folder" else file


def _unreadable(what: str, name: str, path: Path, reason: str) -> FIDError:
    return FIDError(f"cannot read {what}: '{name}' in {path} is not a readable image ({reason}); "
                    "replace or remove that file")


def _header_sizes(what: str, path: Path, names: list[str],
                  open_file: Callable[[str], IO[bytes]]) -> dict[tuple[int, int], str]:
    """(H, W) -> the first image of that size, reading each image's header only."""
    sizes: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            with open_file(name) as handle:
                if not handle.read(1):
                    raise _unreadable(what, name, path, "the file is empty")
                handle.seek(0)
                with Image.open(handle) as im:
                    if im.width * im.height > MAX_IMAGE_PIXELS:
                        raise _unreadable(what, name, path, f"{im.width}x{im.height} is more "
                                          f"than the {MAX_IMAGE_PIXELS:,} pixels allowed")
                    sizes.setdefault((im.height, im.width), name)
        except FIDError:
            raise
        except READ_ERRORS as exc:
            raise _unreadable(what, name, path, read_error_reason(exc)) from None
    return sizes


def _uniform_size(sizes: dict[tuple[int, int], str], path: Path, what: str) -> tuple[int, int]:
    """Return the single (H, W) in ``sizes`` (size -> example file) or raise FIDError."""
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h} (e.g. {name})" for (h, w), name in list(sizes.items())[:3])
        raise FIDError(f"{what} in {path} have mixed sizes: {listed}; resize them to one size")
    return next(iter(sizes))


def _load_npz_images(path: Path, what: str) -> np.ndarray:
    """Load a (N, H, W, C) uint8 array from an npz, as (N, H, W, 3) RGB."""
    try:  # every header checked against its bytes and free memory before an array is made
        keys = npz_names(path)
        key = next((k for k in NPZ_IMAGE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        images = load_npz(path, [key])[key] if key is not None else None
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise FIDError(f"cannot read {what} file {path}: {one_line(exc)}") from None
    if images is None:
        raise FIDError(
            f"{path} has no image array: expected one of {', '.join(NPZ_IMAGE_KEYS)} "
            f"(found {', '.join(keys) or 'nothing'})"
        )
    if images.dtype != np.uint8:
        raise FIDError(f"{path}[{key!r}] must be uint8 images in [0, 255], got {images.dtype}")
    if images.ndim == 3:  # (N, H, W) greyscale
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise FIDError(
            f"{path}[{key!r}] must be NHWC images with 1, 3 or 4 channels, got shape {images.shape}"
        )
    # Match PIL's convert("RGB"), which clean-fid applies to image files: grey is replicated,
    # alpha is dropped.
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images[..., :3])


def open_image_set(path: Path | str, *, what: str = "samples") -> ImageSet:
    """List and validate a folder, zip, or npz of images without decoding their pixels.

    Args:
        path: a folder of image files (searched recursively), a ``.zip`` with images anywhere
            inside (EDM/StyleGAN layout; ``dataset.json`` and other non-images are ignored),
            or a ``.npz`` holding (N, H, W, C) uint8 images.
        what: "samples" or "reference images", used in error messages.

    Returns:
        The validated ``ImageSet``.

    Raises:
        FIDError: missing path, no images (fewer than 2: a covariance needs two), mixed sizes,
            or an unreadable file (named, with its folder or zip).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FIDError(f"{what} not found: {path}")
    sizes: dict[tuple[int, int], str] = {}
    files: list[str] = []
    array: np.ndarray | None = None
    try:
        if path.is_dir():
            kind = "folder"
            names = folder_image_names(path)
            # Regular files only: a link to /dev/zero or a pipe named x.png would never end.
            sizes = _header_sizes(what, path, names, lambda name: open_regular(path / name))
            files = [str(path / name) for name in names]
        elif path.suffix.lower() == ".zip":
            kind = "zip"
            # clean-fid switches to zip reading when ".zip" occurs in the path string.
            if ".zip" not in str(path):
                raise FIDError(f"rename {path} to end in lower-case .zip so it can be read")
            with zipfile.ZipFile(path) as zf:
                files = image_names(zf.namelist())
                for name in files:  # a member that would inflate past any image is a bomb
                    try:
                        check_zip_member(zf.getinfo(name), MAX_IMAGE_FILE_BYTES)
                    except ValueError as exc:
                        raise _unreadable(what, name, path, str(exc)) from None
                sizes = _header_sizes(what, path, files, zf.open)
        elif path.suffix.lower() == ".npz":
            kind = "npz"
            array = _load_npz_images(path, what)
            if len(array):
                sizes[array.shape[1:3]] = "all"
        else:
            raise FIDError(f"{what} must be a folder of images, a .zip or a .npz of uint8 images: {path}")
    except (OSError, zipfile.BadZipFile) as exc:  # the folder or zip itself
        raise FIDError(f"cannot read {what} in {path}: {read_error_reason(exc)}") from None
    count = len(array) if array is not None else len(files)
    if count < 2:
        exts = ", ".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))
        found = "no images" if count == 0 else "only 1 image"
        raise FIDError(f"{what}: {found} in {path} (looked for {exts}); FID needs at least 2")
    return ImageSet(kind, path, files, array, _uniform_size(sizes, path, what), what)


def find_unreadable(images: ImageSet) -> tuple[str, str] | None:
    """(name, reason) of the first file of a folder or zip set that does not decode, else None.

    Run only after a decode failed: clean-fid's loader does not say which file it was reading.
    """
    if images.array is not None:
        return None
    archive = zipfile.ZipFile(images.path) if images.kind == "zip" else contextlib.nullcontext()
    with archive as zf:
        for file in images.files:
            name = images.name_of(file)
            try:
                if zf is not None:  # reading to the end checks the member's CRC
                    data = read_zip_member(zf, file, max_bytes=MAX_IMAGE_FILE_BYTES)
                else:
                    data = read_regular(file, max_bytes=MAX_IMAGE_FILE_BYTES)
                decode_image(data, name, 3)
            except READ_ERRORS as exc:
                return name, read_error_reason(exc)
    return None
