"""FID of a folder / zip / npz of samples against a reference, using clean-fid's pipeline.

clean-fid does the image loading, resizing and batching (``cleanfid.fid.get_files_features``),
so a traflow FID follows clean-fid's protocol for the chosen mode; traflow supplies the feature
model (``inception.load_inception``, which works offline) and the Fréchet distance
(``frechet.frechet_distance``, which works on every SciPy).

The default protocol, as for CIFAR-10 in the literature that uses clean-fid, is mode
``legacy_tensorflow`` against the training split.

One job per module, all re-exported here: ``image_sets`` (what is measured), ``features``
(Inception features through clean-fid), ``reference`` (reference statistics and their cache),
``inception`` (the network), ``frechet`` (the distance).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import cleanfid
import torch

from traflow_cli.errors import FIDError
from traflow_cli.metrics.features import extract_features, feature_stats
from traflow_cli.metrics.frechet import frechet_distance
from traflow_cli.metrics.image_sets import ImageSet, open_image_set
from traflow_cli.metrics.inception import FID_MODES, InceptionInfo, check_mode, load_inception
from traflow_cli.metrics.reference import (
    RefInfo,
    check_reference_path,
    default_cache_dir,
    reference_stats,
)

__all__ = [
    "FID_MODES",
    "FIDError",
    "FIDResult",
    "ImageSet",
    "InceptionInfo",
    "RefInfo",
    "compute_fid",
    "default_cache_dir",
    "extract_features",
    "feature_stats",
    "frechet_distance",
    "load_inception",
    "open_image_set",
    "reference_stats",
]


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


# Inception on CPU is ~1.6x faster per image in batches of 8 than of 96 (its 299x299
# activations stay in cache; benchmarks/test_bench_fid.py); a GPU wants large batches.
CPU_BATCH = 8
GPU_BATCH = 100


def compute_fid(
    samples: Path | str,
    ref: str,
    *,
    mode: str = "legacy_tensorflow",
    split: str = "train",
    batch_size: int | None = None,
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
        batch_size: images per Inception forward pass (default: ``CPU_BATCH`` on a CPU,
            ``GPU_BATCH`` elsewhere).
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
    check_mode(mode)
    images = open_image_set(samples, what="samples")
    h, w = images.size
    if h != w:
        raise FIDError(f"samples in {images.path} are {w}x{h}; FID here expects square images")
    # Cheap failures first: a missing reference path before the network is loaded, and the
    # network and the reference before any sample is pushed through Inception.
    check_reference_path(ref)
    device = torch.device(device)
    if batch_size is None:
        batch_size = CPU_BATCH if device.type == "cpu" else GPU_BATCH
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
