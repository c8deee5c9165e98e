"""Fréchet distance between two Gaussians, in float64, with numpy/scipy only.

clean-fid 0.1.35 computes the trace term with ``scipy.linalg.sqrtm(..., disp=False)``;
SciPy 1.18 removed the ``disp`` argument, so traflow computes the distance itself.

For covariances ``S1``, ``S2`` (symmetric positive semi-definite) the matrix ``S1 @ S2`` is
similar to ``A = sqrt(S1) @ S2 @ sqrt(S1)``, which is symmetric PSD.  Hence
``trace(sqrtm(S1 @ S2)) == sum(sqrt(eigvalsh(A)))``, which needs only symmetric
eigendecompositions: these are backward stable, never produce complex output, and exist in every
SciPy release.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

# Defined with the other error types; imported from here too by older code.
from traflow_cli.errors import FIDError


def _as_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert one Gaussian's statistics to float64.

    Args:
        mu: mean, shape (D,) (a scalar is taken as D=1).
        sigma: covariance, shape (D, D).
        which: "first" or "second", for the error message.

    Returns:
        ``(mu, sigma)`` as float64 arrays of shapes (D,) and (D, D).
    """
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f"{which} statistics have mismatched shapes: mu {mu.shape}, sigma {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{which} statistics contain NaN or inf (too few images to estimate a covariance?)")
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix.

    Args:
        sigma: (D, D) covariance.

    Returns:
        (D, D) symmetric matrix ``R`` with ``R @ R ~= sigma``.
    """
    # Symmetrize first: np.cov output is symmetric only up to rounding, and eigh reads one triangle.
    w, v = scipy.linalg.eigh((sigma + sigma.T) * 0.5)
    return (v * np.sqrt(_zero_noise(w))) @ v.T


def _zero_noise(w: np.ndarray) -> np.ndarray:
    """Set eigenvalues indistinguishable from rounding noise to exactly zero.

    A sample covariance from N < D points is singular; eigh returns its zero eigenvalues as
    +-(D * eps * max|w|)-sized noise. Negative ones would give NaN square roots, and positive ones
    would add ~sqrt(noise) each to the trace (about 1e-4 in FID for 20 vs 20 Inception
    features). Any true eigenvalue that small contributes no more than the noise does.

    Args:
        w: (D,) eigenvalues of a symmetric PSD matrix.

    Returns:
        (D,) non-negative eigenvalues.
    """
    tol = w.shape[0] * np.finfo(np.float64).eps * float(np.abs(w).max(initial=0.0))
    return np.where(w > tol, w, 0.0)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Compute ``trace(sqrtm(sigma1 @ sigma2))`` for PSD covariances.

    Args:
        sigma1: (D, D) covariance.
        sigma2: (D, D) covariance.

    Returns:
        The trace as a Python float (float64 precision).
    """
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eig = scipy.linalg.eigh((inner + inner.T) * 0.5, eigvals_only=True)
    return float(np.sqrt(_zero_noise(eig)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2))``, the quantity
    reported as FID when the statistics are Inception pool3 features.

    Args:
        mu1: (D,) mean of the first distribution.
        sigma1: (D, D) covariance of the first distribution.
        mu2: (D,) mean of the second distribution.
        sigma2: (D, D) covariance of the second distribution.

    Returns:
        The distance as a float. It can be a tiny negative number (~-1e-10) for identical inputs
        because of rounding; it is not clipped so that it stays comparable with clean-fid.

    Raises:
        FIDError: on mismatched shapes or non-finite statistics.
    """
    mu1, sigma1 = _as_stats(mu1, sigma1, "first")
    mu2, sigma2 = _as_stats(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise FIDError(f"statistics have different feature sizes: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    trace_term = np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + trace_term)
