"""Reading files that someone else wrote: sizes checked before anything is allocated.

A run folder, a dataset or an .npz may come from another tool, an edit, or an attacker. What
reads them here never trusts a size it has not checked: a JSON document is bounded in bytes and
in nesting depth, a file must be a regular file (not /dev/zero, a pipe, a socket), a zip member's
stated size must be possible for its compressed size and within a limit before it is inflated,
and an .npy header's shape must match the bytes the member holds before an array is made.

Each check raises ValueError (or OSError from the file system) with a reason in one line; the
caller names the file and the fix. Stdlib only at import time (numpy loads inside `load_npz`), so
the torch-free modules (run folders, file listings) can use it.
"""

from __future__ import annotations

import json
import math
import os
import stat
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

#: Nesting a traflow record or dataset.json never needs (spec.json is 4 deep); deeper documents
#: are refused before anything recurses into them.
MAX_JSON_DEPTH = 32
#: Deflate cannot compress better than about 1032:1; a zip member claiming more lies about its size.
MAX_DEFLATE_RATIO = 1100


def json_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON nests deeper than `limit` lists/objects (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_json(data: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON text -> value; raises ValueError for invalid text, bad UTF-8, or nesting deeper
    than `max_depth` (which would otherwise end in a RecursionError somewhere later)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    if json_depth_exceeds(value, max_depth):
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value


def read_json_file(path: Path, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON file of at most `max_bytes` (a regular file), parsed with `parse_json`."""
    return parse_json(read_regular(path, max_bytes=max_bytes), max_depth=max_depth)


def open_regular(path: Path | str) -> IO[bytes]:
    """Open a file for reading only if it is a regular file (following links): a link to
    /dev/zero, a pipe or a socket would never end, or block. Raises ValueError or OSError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode)
                    or stat.S_ISBLK(mode) else "a pipe" if stat.S_ISFIFO(mode) else
                    "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise ValueError(f"it is {kind}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path | str, limit: int = -1, *, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file (the first `limit` when limit >= 0); a file larger than
    `max_bytes` is refused before it is read, even for its first bytes (a header read at open
    then fails there, not at its first decode). Raises ValueError or OSError."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"it holds {size:,} bytes, more than the {max_bytes:,} allowed")
        return bounded_read(handle, limit, max_bytes)


def bounded_read(handle: IO[bytes], limit: int = -1, max_bytes: int | None = None) -> bytes:
    """Read to the end (or `limit` bytes), refusing more than `max_bytes` whatever a header said."""
    if max_bytes is None:
        return handle.read(limit)
    want = max_bytes + 1 if limit < 0 else min(limit, max_bytes + 1)
    data = handle.read(want)
    if len(data) > max_bytes:
        raise ValueError(f"it holds more than the {max_bytes:,} bytes allowed")
    return data


def check_zip_member(info: zipfile.ZipInfo, max_bytes: int | None) -> None:
    """Refuse a zip member before inflating it: larger than `max_bytes` once inflated, or
    claiming a compression ratio deflate cannot reach (a bomb's lie). Raises ValueError."""
    if info.is_dir():
        raise ValueError("it is a folder entry, not a file")
    if max_bytes is not None and info.file_size > max_bytes:
        raise ValueError(f"it inflates to {info.file_size:,} bytes, more than the "
                         f"{max_bytes:,} allowed")
    if (info.compress_type != zipfile.ZIP_STORED
            and info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1)):
        raise ValueError(f"it claims to inflate {info.compress_size:,} bytes to "
                         f"{info.file_size:,}, more than compression allows (a zip bomb?)")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise ValueError(f"it is stored uncompressed but its sizes disagree ({info.compress_size:,}"
                         f" vs {info.file_size:,} bytes)")


def read_zip_member(zf: zipfile.ZipFile, name: str, limit: int = -1, *,
                    max_bytes: int | None) -> bytes:
    """A zip member's bytes (the first `limit` when limit >= 0) after `check_zip_member`;
    reading stops past `max_bytes` even if the member's stated size lied. Raises KeyError for
    a missing member, ValueError, zipfile.BadZipFile or zlib.error for a bad one."""
    info = zf.getinfo(name)
    check_zip_member(info, max_bytes)
    with zf.open(info) as handle:
        return bounded_read(handle, limit, max_bytes)


def available_memory() -> int | None:
    """Bytes of memory this machine can still give without swapping (None if unknown)."""
    try:
        with open("/proc/meminfo", "rb") as handle:
            for line in handle:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def memory_budget() -> int | None:
    """The most bytes one array read from an untrusted file may take: 3/4 of what is free."""
    free = available_memory()
    return None if free is None else free * 3 // 4


def _npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    import numpy as np

    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(handle)
    raise ValueError(f"npy format version {version[0]}.{version[1]} is not supported")


def npz_names(path: Path) -> list[str]:
    """The names of an .npz's members as np.load lists them ('.npy' dropped), nothing read."""
    with open_regular(path) as raw, zipfile.ZipFile(raw) as zf:
        return [info.filename.removesuffix(".npy") for info in zf.infolist() if not info.is_dir()]


def load_npz(path: Path, keys: Iterable[str] | None = None, *,
             max_bytes: int | None = -1) -> dict[str, np.ndarray]:
    """Arrays of an .npz (all of them, or `keys` that it holds), each checked before it is made:
    an .npy member (not raw bytes), numbers (no pickled objects), a header whose shape times
    item size is what the member holds, all within `max_bytes` together (-1: the memory
    budget, None: no limit). Raises ValueError, OSError or zipfile.BadZipFile in one line."""
    import numpy as np

    if max_bytes == -1:
        max_bytes = memory_budget()
    with open_regular(path) as raw, zipfile.ZipFile(raw) as zf:
        members = {info.filename.removesuffix(".npy"): info for info in zf.infolist()
                   if not info.is_dir()}
        wanted = list(members) if keys is None else [k for k in keys if k in members]
        arrays: dict[str, np.ndarray] = {}
        total = 0
        for key in wanted:
            info = members[key]
            check_zip_member(info, None)
            with zf.open(info) as handle:
                try:
                    shape, fortran, dtype = _npy_header(handle)
                except ValueError as exc:
                    raise ValueError(f"member {info.filename!r} is not an array ({exc})") from None
                if dtype.hasobject:
                    raise ValueError(f"member {info.filename!r} holds Python objects (a pickle), "
                                     "not numbers; traflow never unpickles an .npz")
                if any(d < 0 for d in shape):
                    raise ValueError(f"member {info.filename!r} has shape {shape}")
                nbytes = math.prod(shape) * dtype.itemsize
                held = info.file_size - handle.tell()
                if nbytes != held:
                    raise ValueError(f"member {info.filename!r} claims shape {list(shape)} of "
                                     f"{dtype} ({nbytes:,} bytes) but holds {held:,} bytes")
                total += nbytes
                if max_bytes is not None and total > max_bytes:
                    raise ValueError(f"its arrays need {total:,} bytes of memory, more than the "
                                     f"{max_bytes:,} free")
                array = np.empty(math.prod(shape), dtype=dtype)
                view = memoryview(array.view(np.uint8).reshape(-1)) if nbytes else None
                filled = 0
                while view is not None and filled < nbytes:
                    got = handle.readinto(view[filled:])
                    if not got:
                        raise ValueError(f"member {info.filename!r} ends after {filled:,} of "
                                         f"{nbytes:,} bytes")
                    filled += got
                arrays[key] = array.reshape(shape, order="F" if fortran else "C")
    return arrays
