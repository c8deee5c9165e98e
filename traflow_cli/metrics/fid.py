"""FID of a folder / zip / npz of samples against a reference, using clean-fid's pipeline.

clean-fid does the image loading, resizing and batching (``cleanfid.fid.get_files_features``),
so a traflow FID follows clean-fid's protocol for the chosen mode; traflow supplies the feature
model (``inception.load_inception``, which works offline) and the Fréchet distance
(``frechet.frechet_distance``, which works on every SciPy).

The default protocol, as for CIFAR-10 in the literature that uses clean-fid, is mode
``legacy_tensorflow`` against the training split.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cleanfid
import numpy as np
import torch
import torchvision.transforms
from cleanfid.fid import get_batch_features, get_files_features
from cleanfid.resize import build_resizer
from PIL import Image, UnidentifiedImageError
from torch import nn

from traflow_cli.metrics.frechet import FIDError, frechet_distance
from traflow_cli.metrics.inception import (
    DOWNLOAD_TIMEOUT_S,
    FEATURE_DIM,
    FID_MODES,
    InceptionInfo,
    download_file,
    load_inception,
)

__all__ = [
    "FID_MODES",
    "FIDError",
    "FIDResult",
    "ImageSet",
    "InceptionInfo",
    "RefInfo",
    "compute_fid",
    "extract_features",
    "feature_stats",
    "frechet_distance",
    "load_inception",
    "open_image_set",
    "reference_stats",
]

#: Image file types read from folders and zips (clean-fid's list minus .npy, which is not an
#: image format a generator writes).
IMAGE_EXTENSIONS = frozenset({"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"})

#: Where clean-fid's precomputed reference statistics live online (``cleanfid.features``).
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats"

#: Keys tried, in order, for the image array in a samples ``.npz``. "arr_0" is what
#: ``np.savez(path, images)`` writes, the convention of most sampling scripts.
NPZ_IMAGE_KEYS = ("images", "samples", "arr_0")


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


@dataclass(frozen=True)
class FIDResult:
    """One FID measurement, with everything needed to state how it was measured.

    Attributes:
        fid: the Fréchet Inception Distance.
        num_samples: number of sample images.
        mode: clean-fid mode ("legacy_tensorflow", "clean" or "legacy_pytorch").
        reference: where the reference statistics came from.
        inception: which network file computed the features.
        split: reference split.
        resolution: sample (and reference) image resolution.
        samples: the samples path.
        cleanfid_version: version of clean-fid whose pipeline was used.
    """

    fid: float
    num_samples: int
    mode: str
    reference: RefInfo
    inception: InceptionInfo
    split: str
    resolution: int
    samples: str = ""
    cleanfid_version: str = field(default_factory=lambda: _cleanfid_version())

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-serialisable dict; ``reference`` and ``inception`` become dicts."""
        out = asdict(self)
        out["reference"] = self.reference.to_dict()
        out["inception"] = self.inception.to_dict()
        return out


def _cleanfid_version() -> str:
    try:
        from importlib.metadata import version

        return version("clean-fid")
    except Exception:  # metadata can be missing in odd installs; the version is informative only
        return getattr(cleanfid, "__version__", "unknown")


def _check_mode(mode: str) -> None:
    if mode not in FID_MODES:
        raise FIDError(f"unknown FID mode {mode!r}; choose one of {', '.join(FID_MODES)}")


# --------------------------------------------------------------------------------------------
# Image sets


@dataclass
class ImageSet:
    """A validated collection of equally sized images.

    Attributes:
        kind: "folder", "zip" or "npz".
        path: the folder, zip or npz file.
        files: image paths (folder) or member names (zip); empty for npz.
        array: (N, H, W, 3) uint8 images for npz, else None.
        size: (H, W) shared by every image.
    """

    kind: str
    path: Path
    files: list[str]
    array: np.ndarray | None
    size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.files)


def _is_image_name(name: str) -> bool:
    base = os.path.basename(name)
    # "._x.png" are macOS resource forks and "__MACOSX/" their zip folder: not decodable images.
    if base.startswith("._") or "__MACOSX/" in name:
        return False
    return os.path.splitext(base)[1].lower().lstrip(".") in IMAGE_EXTENSIONS


def _list_folder(folder: Path) -> list[str]:
    files = []
    for root, _dirs, names in os.walk(folder):
        files.extend(os.path.join(root, n) for n in names if _is_image_name(n))
    return sorted(files)


def _uniform_size(sizes: dict[tuple[int, int], str], path: Path, what: str) -> tuple[int, int]:
    """Return the single (H, W) in ``sizes`` (size -> example file) or raise FIDError."""
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h} (e.g. {name})" for (h, w), name in list(sizes.items())[:3])
        raise FIDError(f"{what} in {path} have mixed sizes: {listed}; resize them to one size")
    return next(iter(sizes))


def _load_npz_images(path: Path, what: str) -> np.ndarray:
    """Load a (N, H, W, C) uint8 array from an npz, as (N, H, W, 3) RGB."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.files)
            key = next((k for k in NPZ_IMAGE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            images = data[key] if key is not None else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FIDError(f"cannot read {what} file {path}: {exc}") from None
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
            or an unreadable file.
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
            files = _list_folder(path)
            for name in files:
                with Image.open(name) as im:  # reads the header only
                    sizes.setdefault((im.height, im.width), name)
        elif path.suffix.lower() == ".zip":
            kind = "zip"
            # clean-fid switches to zip reading when ".zip" occurs in the path string.
            if ".zip" not in str(path):
                raise FIDError(f"rename {path} to end in lower-case .zip so it can be read")
            with zipfile.ZipFile(path) as zf:
                files = sorted(n for n in zf.namelist() if not n.endswith("/") and _is_image_name(n))
                for name in files:
                    with zf.open(name) as fh, Image.open(fh) as im:
                        sizes.setdefault((im.height, im.width), name)
        elif path.suffix.lower() == ".npz":
            kind = "npz"
            array = _load_npz_images(path, what)
            if len(array):
                sizes[array.shape[1:3]] = "all"
        else:
            raise FIDError(f"{what} must be a folder of images, a .zip or a .npz of uint8 images: {path}")
    except (OSError, UnidentifiedImageError, zipfile.BadZipFile) as exc:
        raise FIDError(f"cannot read {what} in {path}: {exc}") from None
    count = len(array) if array is not None else len(files)
    if count < 2:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        found = "no images" if count == 0 else "only 1 image"
        raise FIDError(f"{what}: {found} in {path} (looked for {exts}); FID needs at least 2")
    return ImageSet(kind, path, files, array, _uniform_size(sizes, path, what))


# --------------------------------------------------------------------------------------------
# Features


class _ArrayImages(torch.utils.data.Dataset):
    """(N, H, W, 3) uint8 images served exactly as ``cleanfid.utils.ResizeDataset`` serves files.

    Each item is a (3, H', W') float32 tensor in [0, 255], resized for ``mode`` by clean-fid's own
    resizer (legacy_tensorflow: unchanged; clean/legacy_pytorch: 299x299).
    """

    def __init__(self, images: np.ndarray, mode: str) -> None:
        self.images = images
        self.fn_resize = build_resizer(mode)
        self.to_tensor = torchvision.transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        resized = self.fn_resize(self.images[i])
        # Same conversion as clean-fid: ToTensor scales uint8 to [0, 1] (so scale back), and
        # leaves the float32 output of its resizers in [0, 255] untouched.
        if resized.dtype == np.uint8:
            return self.to_tensor(np.array(resized)) * 255
        return self.to_tensor(resized)


def extract_features(
    images: ImageSet,
    model: nn.Module,
    *,
    mode: str,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> np.ndarray:
    """Inception features of every image, through clean-fid's loading and resizing.

    Args:
        images: from ``open_image_set``.
        model: from ``load_inception(..., mode=mode)``.
        mode: clean-fid mode.
        batch_size: images per forward pass.
        device: where ``model`` runs.
        num_workers: DataLoader worker processes for decoding and resizing.

    Returns:
        (N, 2048) float64 features, in ``images`` order.

    Raises:
        FIDError: when an image cannot be decoded.
    """
    try:
        with torch.inference_mode():
            if images.array is not None:
                loader = torch.utils.data.DataLoader(
                    _ArrayImages(images.array, mode),
                    batch_size=batch_size,
                    shuffle=False,
                    num_workers=num_workers,
                )
                feats = np.concatenate([get_batch_features(b, model, device) for b in loader])
            else:
                feats = get_files_features(
                    images.files,
                    model,
                    num_workers=num_workers,
                    batch_size=batch_size,
                    device=device,
                    mode=mode,
                    # For zips clean-fid reads members of fdir; for folders files are full paths.
                    fdir=str(images.path) if images.kind == "zip" else None,
                    verbose=False,
                )
    except (OSError, UnidentifiedImageError, zipfile.BadZipFile) as exc:
        raise FIDError(f"cannot read an image in {images.path}: {exc}") from None
    # The width is not pinned to 2048: tests drive this pipeline with small stand-in networks.
    # Statistics of different widths are rejected later by frechet_distance.
    if feats.ndim != 2 or feats.shape[0] != len(images):
        raise FIDError(f"unexpected feature shape {feats.shape} for {len(images)} images")
    return feats.astype(np.float64)


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


# --------------------------------------------------------------------------------------------
# Reference statistics


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


def _fingerprint(path: Path) -> str:
    """Short digest identifying a reference folder or zip, so edits invalidate its cache.

    Folder: resolved path, image count and total bytes (cheap stats, no decoding).
    Zip: resolved path, size and modification time.
    """
    h = hashlib.sha1(str(path.resolve()).encode())
    if path.is_dir():
        files = _list_folder(path)
        h.update(f"{len(files)}:{sum(os.path.getsize(f) for f in files)}".encode())
    else:
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def _load_stats_npz(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """Read ``mu`` (D,), ``sigma`` (D, D) (D = 2048 for Inception) and scalar metadata."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.files)
            arrays = {k: data[k] for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FIDError(f"cannot read reference statistics {path}: {exc}") from None
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _looks_like_path(ref: str) -> bool:
    return (
        os.sep in ref
        or "/" in ref
        or ref.startswith((".", "~"))
        or Path(ref).suffix.lower() in (".npz", ".zip")
    )


def _check_reference_path(ref: str) -> None:
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
    _check_mode(mode)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = Path(ref).expanduser()
    if not path.exists():
        _check_reference_path(ref)
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
    stats_file = cache_dir / f"{name}_{_slug(split)}_{resolution}_{mode}_{_fingerprint(path)}.npz"
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


# --------------------------------------------------------------------------------------------
# FID


def compute_fid(
    samples: Path | str,
    ref: str,
    *,
    mode: str = "legacy_tensorflow",
    split: str = "train",
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    cache_dir: Path | None = None,
    allow_download: bool = True,
) -> FIDResult:
    """FID of ``samples`` against ``ref`` with clean-fid's protocol for ``mode``.

    Args:
        samples: a folder of PNG/JPG images (searched recursively), a ``.zip`` of images, or a
            ``.npz`` of (N, H, W, C) uint8 images. All must share one square size.
        ref: see ``reference_stats``; e.g. "cifar10" (clean-fid statistics), a folder, a zip,
            or a ``.npz`` with mu and sigma.
        mode: "legacy_tensorflow" (default; the usual CIFAR-10 protocol), "clean" or
            "legacy_pytorch".
        split: reference split, "train" by default.
        batch_size: images per Inception forward pass.
        device: where the Inception network runs.
        num_workers: DataLoader workers for decoding/resizing.
        cache_dir: where reference statistics are cached (default ``default_cache_dir()``).
        allow_download: allow fetching network weights and clean-fid statistics.

    Returns:
        ``FIDResult``.

    Raises:
        FIDError: on any user-facing problem (bad mode, empty or mixed-size samples, missing
            reference, no Inception network), with a one-line message.
    """
    _check_mode(mode)
    images = open_image_set(samples, what="samples")
    h, w = images.size
    if h != w:
        raise FIDError(f"samples in {images.path} are {w}x{h}; FID here expects square images")
    # Cheap failures first: a missing reference path before the network is loaded, and the
    # network and the reference before any sample is pushed through Inception.
    _check_reference_path(ref)
    device = torch.device(device)
    model, net_info = load_inception(device, allow_download=allow_download, mode=mode)
    ref_mu, ref_sigma, ref_info = reference_stats(
        ref,
        mode=mode,
        split=split,
        resolution=h,
        device=device,
        cache_dir=cache_dir,
        batch_size=batch_size,
        num_workers=num_workers,
        allow_download=allow_download,
        inception=(model, net_info),
    )
    feats = extract_features(
        images, model, mode=mode, batch_size=batch_size, device=device, num_workers=num_workers
    )
    mu, sigma = feature_stats(feats)
    return FIDResult(
        fid=frechet_distance(mu, sigma, ref_mu, ref_sigma),
        num_samples=len(images),
        mode=mode,
        reference=ref_info,
        inception=net_info,
        split=split,
        resolution=h,
        samples=str(images.path),
    )
