"""Inception features of an image set through clean-fid's own loading and resizing."""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import Protocol

import numpy as np
import torch
import torchvision.transforms
from cleanfid.fid import get_batch_features
from cleanfid.resize import build_resizer
from cleanfid.utils import ResizeDataset
from torch import nn

from traflow_cli.data.images.decode import READ_ERRORS
from traflow_cli.errors import FIDError, one_line
from traflow_cli.metrics.image_sets import ImageSet, find_unreadable


class Progress(Protocol):
    def update(self, completed: int) -> None: ...


# (title, number of images) -> a context manager giving a Progress, e.g. the engine's
# ProgressBar: how extract_features reports, set by the job that runs it (the metrics know
# nothing of the engine); None, the default, is silent.
ProgressFactory = Callable[[str, int], AbstractContextManager[Progress]]
_progress: ContextVar[ProgressFactory | None] = ContextVar("feature_progress", default=None)


@contextlib.contextmanager
def feature_progress(factory: ProgressFactory | None) -> Iterator[None]:
    """Within this block, extract_features reports its images done through `factory`."""
    token = _progress.set(factory)
    try:
        yield
    finally:
        _progress.reset(token)


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

    The loop is clean-fid's `get_files_features` (its ResizeDataset in a DataLoader, then
    `get_batch_features`), with traflow's progress on stderr in place of its tqdm bar.

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
        FIDError: when an image cannot be decoded (naming it, with its folder or zip).
    """
    if images.array is not None:
        dataset: torch.utils.data.Dataset = _ArrayImages(images.array, mode)
    else:
        # For zips clean-fid reads members of fdir; for folders files are full paths.
        dataset = ResizeDataset(images.files, fdir=str(images.path) if images.kind == "zip"
                                else None, mode=mode)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         drop_last=False, num_workers=num_workers)
    batches: list[np.ndarray] = []
    done = 0
    title = "fid-" + images.what.split()[0]  # fid-samples, fid-reference
    factory = _progress.get()
    report = factory(title, len(images)) if factory else contextlib.nullcontext(None)
    try:
        with torch.inference_mode(), report as bar:
            for batch in loader:
                batches.append(get_batch_features(batch, model, device))
                done += len(batch)
                if bar is not None:
                    bar.update(done)
        feats = np.concatenate(batches)
    except READ_ERRORS as exc:
        # clean-fid's loader does not say which file failed: find it (costs a pass only now).
        culprit = find_unreadable(images)
        if culprit is not None:
            name, reason = culprit
            raise FIDError(f"cannot read image '{name}' in {images.path} ({reason}); replace or "
                           "remove that file") from None
        if not isinstance(exc, (OSError, zipfile.BadZipFile)):
            raise
        raise FIDError(f"cannot read an image in {images.path}: {one_line(exc)}") from None
    # The width is not pinned to 2048: tests drive this pipeline with small stand-in networks.
    # Statistics of different widths are rejected later by frechet_distance.
    if feats.ndim != 2 or feats.shape[0] != len(images):
        raise FIDError(f"unexpected feature shape {feats.shape} for {len(images)} images")
    return feats.astype(np.float64)


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)
