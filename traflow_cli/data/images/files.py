"""Which files are images: the one extension list and lister that datasets and FID share.

Stdlib only. Names are paths relative to a folder or zip root with '/' separators, sorted, so
item i of a dataset (and its label in dataset.json) always refers to the same file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
#: The most bytes one image file may hold (a 4096x4096 16-bit RGB TIFF is 100 MB): what is
#: larger, or a zip member that would inflate to more, is refused before it is read.
MAX_IMAGE_FILE_BYTES = 256 << 20
#: The most pixels one image may have (datasets and FID sets are at most a few thousand wide).
MAX_IMAGE_PIXELS = 8192 * 8192


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


def _files_under(folder: Path) -> Iterator[str]:
    """Relative paths of the files under folder; symlinked folders are not followed, and the
    walk keeps its own stack (a folder nested thousands deep is no RecursionError)."""
    stack = [(Path(folder), "")]
    while stack:
        here, prefix = stack.pop()
        with os.scandir(here) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if _visible(entry.name):
                        stack.append((Path(entry.path), f"{prefix}{entry.name}/"))
                # A dangling or looping link stays listed, so that reading it reports the file
                # by name (is_file follows the link: a loop raises ELOOP there).
                elif _is_file(entry) or entry.is_symlink():
                    yield prefix + entry.name


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def folder_image_names(folder: Path) -> list[str]:
    """Images under folder, recursively, as sorted relative paths with '/' separators."""
    return image_names(_files_under(Path(folder)))


def folder_has_images(folder: Path) -> bool:
    """Whether folder holds at least one image (stops at the first)."""
    return any(is_image_name(name) for name in _files_under(Path(folder)))
