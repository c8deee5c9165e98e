"""Reference statistics for FID: clean-fid's precomputed ones by dataset name, a statistics .npz,
or a folder/zip of images measured once and cached under a fingerprint of its contents."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import cleanfid
import numpy as np
import torch
from torch import nn

from traflow_cli.data.images.files import folder_image_names
from traflow_cli.errors import one_line
from traflow_cli.metrics.features import extract_features, feature_stats
from traflow_cli.metrics.frechet import FIDError
from traflow_cli.metrics.image_sets import open_image_set
from traflow_cli.metrics.inception import (
    DOWNLOAD_TIMEOUT_S,
    FEATURE_DIM,
    InceptionInfo,
    check_mode,
    download_file,
    load_inception,
)
from traflow_cli.untrusted import load_npz, open_regular, parse_json

#: Where clean-fid's precomputed reference statistics live online (``cleanfid.features``).
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats"


@dataclass(frozen=True)
class RefInfo:
    """Where reference statistics came from.

    Attributes:
        kind: "clean-fid" (precomputed, by dataset name), "folder", "zip" or "npz".
        name: dataset name (clean-fid name, or the folder/zip/npz file stem).
        source: the folder, zip or npz the user named (or the clean-fid dataset name).
        stats_path: the ``.npz`` the statistics were read from or cached to.
        split: dataset split label.
        resolution: image resolution the statistics are for.
        mode: clean-fid mode.
        num_images: number of reference images, when known.
        cached: True when ``stats_path`` already existed (nothing was computed).
    """

    kind: str
    name: str
    source: str
    stats_path: str
    split: str
    resolution: int
    mode: str
    num_images: int | None = None
    cached: bool = False

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-serialisable dict of the fields."""
        return asdict(self)



def default_cache_dir() -> Path:
    """Cache folder: ``$TRAFLOW_CACHE/fid``, else ``$XDG_CACHE_HOME/traflow/fid``.

    (``$XDG_CACHE_HOME`` defaults to ``~/.cache``.)
    """
    if os.environ.get("TRAFLOW_CACHE"):
        return Path(os.environ["TRAFLOW_CACHE"]).expanduser() / "fid"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "traflow" / "fid"


def _slug(text: str) -> str:
    """Make ``text`` safe as part of a file name."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-").lower() or "ref"


def _fingerprint(path: Path, cache_dir: Path) -> str:
    """Short digest of a reference folder's or zip's contents, so any edit invalidates its cache.

    The sha256 of the image names and bytes (a zip: of the whole file). Files are hashed once:
    each one's digest is remembered beside the statistics with its stat key (size, mtime,
    ctime, inode), and hashed again only when that key changes. Replacing a file changes its
    ctime and inode whatever its size and mtime, so the key is never fooled by a same-sized
    file with a copied mtime. An unreadable or special file is a one-line FIDError.
    """
    files = folder_image_names(path) if path.is_dir() else [""]
    index_path = cache_dir / "index" / (
        f"{_slug(path.name)}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}.json")
    try:
        known = parse_json(index_path.read_bytes()) if index_path.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    index: dict[str, list[object]] = {}
    h = hashlib.sha256()
    for name in files:
        file = path / name if name else path
        try:
            st = file.stat()
            key: list[object] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            entry = known.get(name)
            if isinstance(entry, list) and entry[:4] == key and isinstance(entry[-1], str):
                digest = entry[-1]
            else:
                digest = _sha256_regular(file)
        except (OSError, ValueError) as exc:
            raise FIDError(f"cannot read reference file {file}: {one_line(exc)}") from None
        index[name] = [*key, digest]
        h.update(f"{name}\0{digest}\n".encode())
    if index != known:
        with contextlib.suppress(OSError):  # a read-only cache only costs hashing again
            index_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = index_path.with_name(f".{index_path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, index_path)
    return h.hexdigest()[:16]


def _sha256_regular(path: Path) -> str:
    """sha256 of a regular file's bytes, read in 1 MB pieces (a link to /dev/zero is refused)."""
    h = hashlib.sha256()
    with open_regular(path) as handle:
        while chunk := handle.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _load_stats_npz(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """Read ``mu`` (D,), ``sigma`` (D, D) (D = 2048 for Inception) and scalar metadata."""
    try:  # headers checked against the bytes held and free memory before any array is made
        arrays = load_npz(path)
        keys = list(arrays)
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise FIDError(f"cannot read reference statistics {path}: {one_line(exc)}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise FIDError(
            f"{path} has no 'mu' and 'sigma' arrays (found {', '.join(keys) or 'nothing'}); "
            "pass a folder or .zip of images to compute reference statistics"
        )
    mu = np.asarray(arrays.pop("mu"), dtype=np.float64)
    sigma = np.asarray(arrays.pop("sigma"), dtype=np.float64)
    # Metadata written by _save_stats_npz are 0-d arrays; anything larger is not metadata.
    meta = {k: v.item() for k, v in arrays.items() if v.ndim == 0}
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(
            f"{path} holds statistics of shape mu {mu.shape}, sigma {sigma.shape}; "
            f"Inception FID statistics are ({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM})"
        )
    return mu, sigma, meta


def _save_stats_npz(path: Path, mu: np.ndarray, sigma: np.ndarray, **meta: object) -> None:
    """Write statistics atomically, so a killed run never leaves a truncated cache file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".npz", dir=path.parent)
    except OSError as exc:
        raise _cache_error(path, exc) from None
    os.close(fd)
    try:
        np.savez(tmp, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()})
        os.replace(tmp, path)
    except OSError as exc:
        raise _cache_error(path, exc) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cache_error(path: Path, exc: OSError) -> FIDError:
    return FIDError(f"cannot write the reference statistics cache {path} "
                    f"({one_line(exc.strerror or exc)}); free space there, or set $TRAFLOW_CACHE "
                    "to a writable folder")


def _looks_like_path(ref: str) -> bool:
    return (
        os.sep in ref
        or "/" in ref
        or ref.startswith((".", "~"))
        or Path(ref).suffix.lower() in (".npz", ".zip")
    )


def check_reference_path(ref: str) -> None:
    """Raise FIDError when ``ref`` names a file or folder (not a dataset) that does not exist."""
    path = Path(ref).expanduser()
    if not path.exists() and _looks_like_path(ref):
        raise FIDError(
            f"reference not found: {path} (expected a folder or .zip of images, or a .npz "
            "with mu and sigma)"
        )


def _cleanfid_stats(
    name: str, *, mode: str, split: str, resolution: int, cache_dir: Path, allow_download: bool
) -> tuple[np.ndarray, np.ndarray, RefInfo]:
    """Precomputed clean-fid statistics for a dataset name, from a cache or clean-fid's server."""
    res = "na" if split == "custom" else str(resolution)
    # clean-fid's naming scheme (cleanfid.features.get_reference_statistics), lower-cased.
    fname = f"{name}_{mode}_{split}_{res}.npz".lower()
    local = cache_dir / "cleanfid" / fname
    bundled = Path(os.path.dirname(cleanfid.__file__)) / "stats" / fname
    url = f"{CLEANFID_STATS_URL}/{fname}"
    found = next((p for p in (local, bundled) if p.is_file()), None)
    cached = found is not None
    why = "downloads disabled"
    if found is None and allow_download:
        try:
            download_file(url, local, timeout=DOWNLOAD_TIMEOUT_S)
            found = local
        except OSError as exc:
            why = f"download failed: {exc}"
    if found is None:
        raise FIDError(
            f"reference statistics {fname} for dataset {name!r} not found in {local.parent} "
            f"or {bundled.parent} ({why}); run once online to fetch {url}, or pass a folder, "
            ".zip or .npz (mu, sigma) as the reference"
        )
    mu, sigma, meta = _load_stats_npz(found)
    info = RefInfo(
        kind="clean-fid",
        name=name,
        source=name,
        stats_path=str(found),
        split=split,
        resolution=resolution,
        mode=mode,
        num_images=int(meta["num_images"]) if "num_images" in meta else None,
        cached=cached,
    )
    return mu, sigma, info


def reference_stats(
    ref: str,
    *,
    mode: str,
    split: str,
    resolution: int,
    device: torch.device | str = "cpu",
    cache_dir: Path | None = None,
    batch_size: int = 100,
    num_workers: int = 0,
    allow_download: bool = True,
    inception: tuple[nn.Module, InceptionInfo] | None = None,
) -> tuple[np.ndarray, np.ndarray, RefInfo]:
    """Reference statistics (mu, sigma) for FID, cached.

    Args:
        ref: a clean-fid dataset name (e.g. "cifar10"; its precomputed statistics are
            downloaded once when online), a folder of images, a ``.zip`` of images
            (EDM/StyleGAN layout), or a ``.npz`` holding ``mu`` (2048,) and ``sigma``
            (2048, 2048).
        mode: clean-fid mode the statistics must have been computed with.
        split: split label ("train", "test", ...); part of clean-fid names and of cache names.
        resolution: image resolution; reference images must have exactly this size.
        device: where the Inception network runs when statistics must be computed.
        cache_dir: where downloaded and computed statistics are kept (default
            ``default_cache_dir()``).
        batch_size: images per forward pass when computing.
        num_workers: DataLoader workers when computing.
        allow_download: allow fetching clean-fid statistics and network weights.
        inception: an already loaded ``load_inception(..., mode=mode)`` result, to reuse.

    Returns:
        ``(mu, sigma, info)``: float64 arrays of shapes (2048,) and (2048, 2048), and a
        ``RefInfo`` saying where they came from.

    Raises:
        FIDError: unknown mode, missing or unreadable reference, size mismatch.
    """
    check_mode(mode)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = Path(ref).expanduser()
    if not path.exists():
        check_reference_path(ref)
        return _cleanfid_stats(
            ref,
            mode=mode,
            split=split,
            resolution=resolution,
            cache_dir=cache_dir,
            allow_download=allow_download,
        )

    if path.is_file() and path.suffix.lower() == ".npz":
        mu, sigma, meta = _load_stats_npz(path)
        # A stats file that records its protocol must match the requested one: mixing modes
        # gives a meaningless number.
        if "mode" in meta and meta["mode"] != mode:
            raise FIDError(f"{path} holds {meta['mode']} statistics but mode {mode} was requested")
        num = meta.get("num_images")
        info = RefInfo(
            kind="npz",
            name=path.stem,
            source=str(path),
            stats_path=str(path),
            split=split,
            resolution=resolution,
            mode=mode,
            num_images=int(num) if num is not None else None,
            cached=True,
        )
        return mu, sigma, info

    if not (path.is_dir() or path.suffix.lower() == ".zip"):
        raise FIDError(
            f"unsupported reference {path}: expected a folder or .zip of images, a .npz with "
            "mu and sigma, or a clean-fid dataset name"
        )

    kind = "folder" if path.is_dir() else "zip"
    name = _slug(path.stem if kind == "zip" else path.resolve().name)
    stats_file = cache_dir / f"{name}_{_slug(split)}_{resolution}_{mode}_{_fingerprint(path, cache_dir)}.npz"
    if stats_file.is_file():
        mu, sigma, meta = _load_stats_npz(stats_file)
        num = meta.get("num_images")
        info = RefInfo(
            kind=kind,
            name=name,
            source=str(path),
            stats_path=str(stats_file),
            split=split,
            resolution=resolution,
            mode=mode,
            num_images=int(num) if num is not None else None,
            cached=True,
        )
        return mu, sigma, info

    images = open_image_set(path, what="reference images")
    if images.size != (resolution, resolution):
        h, w = images.size
        raise FIDError(
            f"reference images in {path} are {w}x{h} but the samples are "
            f"{resolution}x{resolution}; FID compares images at the same resolution"
        )
    model, net_info = inception or load_inception(device, allow_download=allow_download, mode=mode)
    feats = extract_features(
        images, model, mode=mode, batch_size=batch_size, device=device, num_workers=num_workers
    )
    mu, sigma = feature_stats(feats)
    _save_stats_npz(
        stats_file,
        mu,
        sigma,
        num_images=len(images),
        mode=mode,
        split=split,
        resolution=resolution,
        source=str(path.resolve()),
        inception_sha256=net_info.sha256,
    )
    info = RefInfo(
        kind=kind,
        name=name,
        source=str(path),
        stats_path=str(stats_file),
        split=split,
        resolution=resolution,
        mode=mode,
        num_images=len(images),
    )
    return mu, sigma, info
