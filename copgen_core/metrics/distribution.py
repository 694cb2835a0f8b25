"""Distribution metrics: a generated set against a held-out real reference set (same N at every iteration).

Feature-space metrics take float feature matrices (N, D) from a :mod:`copgen.metrics.features`
extractor; pixel-space metrics take uint8 thumbnail batches (N, H, W, C).

- Fréchet distance between Gaussians fitted to the two feature sets. The matrix square root term
  ``tr(sqrt(S1 S2))`` is computed as ``sum(sqrt(eig(sqrt(S1) S2 sqrt(S1))))``: the matrix inside is
  symmetric positive semi-definite, so ``eigh`` applies and the result is real by construction (no
  complex residue to discard as with ``scipy.linalg.sqrtm`` of the non-symmetric product). Eigenvalues
  that round below zero are clipped to 0. When both sets are smaller than the feature dimension (the
  usual case with 2048-d Inception features) the same trace is the nuclear norm of ``A B'`` for the
  centred feature matrices: exact and much cheaper. scipy is not needed (the tests compare against
  ``scipy.linalg.sqrtm``). FD is biased by N: compare values at equal N only.
- KID: unbiased MMD² with the cubic polynomial kernel ``k(x, y) = (x.y / D + 1)**3``, averaged over
  random subsets (seeded); reported as mean and standard deviation over the subsets.
- k-NN precision/recall (Kynkäänniemi et al. 2019, k=3): a sample is inside the other set's manifold if
  it lies within (<=) the k-th nearest-neighbour radius of some sample of that set; F1 = 2PR/(P+R).
- Density/coverage (Naeem et al. 2020, same k): density counts, per generated sample, the real balls that
  contain it (strictly inside, as the authors' code), divided by k*M; coverage is the fraction of real
  samples whose ball contains at least one generated sample. Identical sets give P=R=coverage=1 and
  density 1 (the k-th neighbour sits exactly on the boundary); independent draws of one distribution
  give density close to 1.
- Per-band Wasserstein-1 between the uint8 pixel-value distributions: the exact W1 of two histograms on
  0..255 (unit spacing), i.e. the sum of absolute CDF differences.
- Diversity: mean pairwise Euclidean feature distance over distinct pairs of one set.
- Tails: per-band mean, standard deviation, 1st/99th percentiles and normalised histograms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from copgen.metrics.errors import MetricInputError, as_uint8_batch

DEFAULT_K = 3


def _features(x: np.ndarray, argument: str, min_rows: int = 2) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise MetricInputError(argument, f"expected a feature matrix (N, D), got shape {array.shape}")
    if array.shape[0] < min_rows:
        raise MetricInputError(argument, f"needs at least {min_rows} samples, got {array.shape[0]}")
    if not np.all(np.isfinite(array)):
        raise MetricInputError(argument, "contains NaN or inf features")
    return array


def _same_dim(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise MetricInputError(names, f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set: cache these for the real reference set."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        f = _features(features, "features")
        return cls(mu=f.mean(0), sigma=np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), n=f.shape[0])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrt(sigma1 @ sigma2)) for covariance matrices, via the symmetric form (module docstring)."""
    root = _sqrt_psd(sigma1)
    inner = root @ sigma2 @ root
    values = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two Gaussians; rounding residue below 0 is clipped to 0."""
    if a.mu.shape != b.mu.shape:
        raise MetricInputError("stats", f"feature dimensions differ: {a.mu.shape} vs {b.mu.shape}")
    diff = a.mu - b.mu
    value = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt_product(a.sigma, b.sigma)
    return max(float(value), 0.0)


def trace_sqrt_product_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """tr(sqrt(cov(a) @ cov(b))) from the feature matrices themselves, without any D x D matrix.

    With centred A (n1, D) and B (n2, D), cov(a) cov(b) = A'A B'B / ((n1-1)(n2-1)); its non-zero
    eigenvalues are those of C C' with C = A B', i.e. the squared singular values of C. So the trace
    is the nuclear norm of C over sqrt((n1-1)(n2-1)): exact, and an SVD of an n1 x n2 matrix instead
    of two D x D eigendecompositions (cheaper whenever the sets are smaller than the dimension).
    """
    ca = a - a.mean(0)
    cb = b - b.mean(0)
    singular = np.linalg.svd(ca @ cb.T, compute_uv=False)
    return float(singular.sum() / np.sqrt((a.shape[0] - 1) * (b.shape[0] - 1)))


def frechet_distance(generated: np.ndarray, reference: np.ndarray | FeatureStats) -> float:
    """Fréchet distance between a generated feature set and a reference set (or its cached stats).

    With two feature matrices smaller than their dimension the trace term uses the exact low-rank form
    (:func:`trace_sqrt_product_from_features`); otherwise the symmetric eigen form.
    """
    stats_a = FeatureStats.from_features(generated)
    if isinstance(reference, FeatureStats):
        return frechet_distance_from_stats(stats_a, reference)
    stats_b = FeatureStats.from_features(reference)
    a = _features(generated, "generated")
    b = _features(reference, "reference")
    _same_dim(a, b, "generated/reference")
    if min(a.shape[0], b.shape[0]) > a.shape[1]:
        return frechet_distance_from_stats(stats_a, stats_b)
    diff = stats_a.mu - stats_b.mu
    value = (
        diff @ diff
        + np.trace(stats_a.sigma)
        + np.trace(stats_b.sigma)
        - 2.0 * trace_sqrt_product_from_features(a, b)
    )
    return max(float(value), 0.0)


def _mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    m = x.shape[0]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    off_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    off_yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off_xx + off_yy - 2.0 * kxy.mean())


def kid(
    generated: np.ndarray,
    reference: np.ndarray,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception distance: (mean, std) of unbiased MMD² over ``n_subsets`` seeded subsets.

    ``subset_size`` is capped at the smaller set size (it must be at least 2). Subsets are drawn without
    replacement within a subset, independently across subsets.
    """
    x = _features(generated, "generated")
    y = _features(reference, "reference")
    _same_dim(x, y, "generated/reference")
    m = min(subset_size, x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(n_subsets, dtype=np.float64)
    for i in range(n_subsets):
        xi = x[rng.choice(x.shape[0], m, replace=False)]
        yi = y[rng.choice(y.shape[0], m, replace=False)]
        values[i] = _mmd2_unbiased_poly(xi, yi)
    return float(values.mean()), float(values.std())


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance matrix (len(a), len(b)) in float64 (torch.cdist, matmul form)."""
    return torch.cdist(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def _kth_neighbour_radius(own: np.ndarray, k: int) -> np.ndarray:
    """Distance of each sample to its k-th nearest neighbour in its own set (itself excluded)."""
    if own.shape[0] <= k:
        raise MetricInputError("features", f"k={k} nearest neighbours need more than {k} samples")
    distances = pairwise_distances(own, own)
    np.fill_diagonal(distances, np.inf)
    return np.partition(distances, k - 1, axis=1)[:, k - 1]


@dataclass(frozen=True)
class PRDC:
    """k-NN precision/recall/F1 and density/coverage, plus each generated sample's distance to its
    nearest reference sample (per-sample, for the tail histograms of §2.3)."""

    precision: float
    recall: float
    f1: float
    density: float
    coverage: float
    nearest_reference_distance: np.ndarray
    k: int


def prdc(generated: np.ndarray, reference: np.ndarray, k: int = DEFAULT_K) -> PRDC:
    """Precision, recall, F1, density and coverage of ``generated`` against ``reference`` features."""
    fake = _features(generated, "generated", min_rows=k + 1)
    real = _features(reference, "reference", min_rows=k + 1)
    _same_dim(fake, real, "generated/reference")
    real_radius = _kth_neighbour_radius(real, k)
    fake_radius = _kth_neighbour_radius(fake, k)
    cross = pairwise_distances(real, fake)  # (M real, N fake)

    precision = float(np.mean(np.any(cross <= real_radius[:, None], axis=0)))
    recall = float(np.mean(np.any(cross <= fake_radius[None, :], axis=1)))
    f1 = 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)
    inside_strict = cross < real_radius[:, None]
    density = float(inside_strict.sum() / (k * fake.shape[0]))
    coverage = float(np.mean(cross.min(axis=1) < real_radius))
    return PRDC(
        precision=precision,
        recall=recall,
        f1=f1,
        density=density,
        coverage=coverage,
        nearest_reference_distance=cross.min(axis=0),
        k=k,
    )


def diversity(features: np.ndarray) -> float:
    """Mean Euclidean distance over all distinct pairs of one feature set (higher = more diverse)."""
    f = _features(features, "features")
    distances = pairwise_distances(f, f)
    n = f.shape[0]
    return float(distances[np.triu_indices(n, k=1)].mean())


def band_histograms(images: np.ndarray | torch.Tensor, bins: int = 256) -> np.ndarray:
    """Normalised per-band histograms (bands, bins) of uint8 values; ``bins`` must divide 256."""
    if bins < 1 or 256 % bins:
        raise MetricInputError("bins", f"must divide 256, got {bins}")
    x = as_uint8_batch(images, "images").numpy()
    bands = x.shape[-1]
    flat = x.reshape(-1, bands).astype(np.int64) // (256 // bins)
    counts = np.stack([np.bincount(flat[:, c], minlength=bins) for c in range(bands)]).astype(np.float64)
    return counts / counts.sum(axis=1, keepdims=True)


def wasserstein_per_band(
    generated: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor
) -> np.ndarray:
    """Exact Wasserstein-1 per band (bands,) between the pixel-value distributions, in uint8 counts."""
    ha = band_histograms(generated)
    hb = band_histograms(reference)
    if ha.shape != hb.shape:
        raise MetricInputError("generated/reference", f"band counts differ: {ha.shape[0]} vs {hb.shape[0]}")
    return np.abs(np.cumsum(ha - hb, axis=1)).sum(axis=1)


@dataclass(frozen=True)
class BandMoments:
    """Per-band pixel statistics of one set (each (bands,)): drift of mean, collapse of std and tails."""

    mean: np.ndarray
    std: np.ndarray
    p01: np.ndarray
    p99: np.ndarray


def band_moments(images: np.ndarray | torch.Tensor) -> BandMoments:
    """Per-band mean, std and 1st/99th percentiles of the uint8 values of a set."""
    x = as_uint8_batch(images, "images").numpy()
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    p01, p99 = np.percentile(flat, [1.0, 99.0], axis=0)
    return BandMoments(mean=flat.mean(0), std=flat.std(0), p01=p01, p99=p99)
