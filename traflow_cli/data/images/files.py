"""Which files are images: the one extension list and lister that datasets and FID share.

Stdlib only. Names are paths relative to a folder or zip root with '/' separators, sorted, so
item i of a dataset (and its label in dataset.json) always refers to the same file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def _visible(part: str) -> bool:
    # Hidden files and macOS resource forks ("._x.png", "__MACOSX/") carry image extensions but
    # hold no image.
    return not part.startswith(".") and part != "__MACOSX"


def is_image_name(name: str) -> bool:
    """Whether a relative path ('a/b.png') names an image we read: known extension, not hidden."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and all(map(_visible, name.split("/")))


def image_names(names: Iterable[str]) -> list[str]:
    """The image paths among relative paths (e.g. a zip's members), sorted."""
    return sorted(n for n in names if not n.endswith("/") and is_image_name(n))


def _files_under(folder: Path, prefix: str = "") -> Iterator[str]:
    """Relative paths of the files under folder; symlinked folders are not followed."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if _visible(entry.name):
                    yield from _files_under(Path(entry.path), f"{prefix}{entry.name}/")
            # A dangling link stays listed, so that reading it reports the file by name.
            elif entry.is_file() or entry.is_symlink():
                yield prefix + entry.name


def folder_image_names(folder: Path) -> list[str]:
    """Images under folder, recursively, as sorted relative paths with '/' separators."""
    return image_names(_files_under(Path(folder)))


def folder_has_images(folder: Path) -> bool:
    """Whether folder holds at least one image (stops at the first)."""
    return any(is_image_name(name) for name in _files_under(Path(folder)))
