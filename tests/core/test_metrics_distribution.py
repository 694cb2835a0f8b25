"""Distribution metrics on constructed feature sets and pixel batches with known behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from copgen.metrics import distribution as dist
from copgen.metrics.errors import MetricInputError


def _gauss(seed: int, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) * scale + shift


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)


@pytest.mark.parametrize("n, d", [(300, 12), (40, 96)])  # full-rank and low-rank covariances
def test_frechet_distance_matches_scipy_sqrtm(n: int, d: int) -> None:
    a, b = _gauss(0, n, d), _gauss(1, n, d, shift=0.3, scale=1.4)
    expected = _scipy_fd(a, b)
    assert dist.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    stats_a, stats_b = dist.FeatureStats.from_features(a), dist.FeatureStats.from_features(b)
    stats = dist.frechet_distance_from_stats(stats_a, stats_b)
    assert stats == pytest.approx(expected, rel=1e-6)
    assert dist.frechet_distance(a, dist.FeatureStats.from_features(b)) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_identical_zero_and_moves_with_shift_and_collapse() -> None:
    a = _gauss(0, 400, 8)
    assert dist.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    floor = dist.frechet_distance(_gauss(1, 400, 8), a)
    shifts = [dist.frechet_distance(_gauss(1, 400, 8, shift=s), a) for s in (0.25, 0.5, 1.0)]
    assert floor < shifts[0] < shifts[1] < shifts[2]
    # A mean shift of s in each of d dims adds d*s**2 to the floor (up to sampling noise).
    assert shifts[2] == pytest.approx(floor + 8 * 1.0, rel=0.15)
    collapsed = dist.frechet_distance(_gauss(1, 400, 8, scale=0.3), a)
    assert collapsed > 4 * floor


def test_kid_zero_within_std_for_same_distribution_and_positive_for_shift() -> None:
    a, b = _gauss(0, 300, 16), _gauss(1, 300, 16)
    mean, std = dist.kid(a, b, n_subsets=50, subset_size=100, seed=0)
    assert std > 0
    assert abs(mean) < 3 * std
    mean_s, std_s = dist.kid(_gauss(1, 300, 16, shift=0.5), a, n_subsets=50, subset_size=100, seed=0)
    assert mean_s > 5 * std_s
    kwargs = {"n_subsets": 5, "subset_size": 100, "seed": 3}
    assert dist.kid(a, b, **kwargs) == dist.kid(a, b, **kwargs)


def test_prdc_identical_sets() -> None:
    a = _gauss(0, 200, 10)
    scores = dist.prdc(a, a.copy(), k=3)
    assert scores.precision == 1.0 and scores.recall == 1.0 and scores.f1 == 1.0
    assert scores.coverage == 1.0
    assert scores.density == pytest.approx(1.0)
    assert np.allclose(scores.nearest_reference_distance, 0.0, atol=1e-6)


def test_prdc_same_distribution_shift_and_collapse() -> None:
    real = _gauss(0, 1000, 6)
    same = dist.prdc(_gauss(1, 1000, 6), real)
    assert same.precision > 0.85 and same.recall > 0.85
    # Naeem et al.: for M = N samples of one distribution, E[coverage] -> 1 - 2**-k.
    assert same.coverage == pytest.approx(1 - 2.0**-3, abs=0.05)
    assert same.density == pytest.approx(1.0, abs=0.15)
    shifted = dist.prdc(_gauss(1, 1000, 6, shift=1.5), real)
    assert shifted.precision < same.precision - 0.2
    assert shifted.recall < same.recall - 0.2
    assert shifted.coverage < same.coverage - 0.2
    collapsed = dist.prdc(_gauss(1, 1000, 6, scale=0.3), real)
    assert collapsed.precision > 0.95  # everything generated is realistic...
    assert collapsed.recall < 0.5 and collapsed.coverage < 0.6  # ...but most of the real set is missed
    assert collapsed.f1 == pytest.approx(
        2 * collapsed.precision * collapsed.recall / (collapsed.precision + collapsed.recall)
    )


def test_diversity_known_value_and_collapse() -> None:
    line = np.array([[0.0], [1.0], [2.0]])
    assert dist.diversity(line) == pytest.approx(4.0 / 3.0)
    a = _gauss(0, 100, 5)
    assert dist.diversity(a * 0.5) == pytest.approx(0.5 * dist.diversity(a))


def test_wasserstein_per_band_exact() -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(20, 200, size=(6, 16, 16, 3)).astype(np.uint8)
    b = rng.integers(0, 256, size=(4, 16, 16, 3)).astype(np.uint8)
    w = dist.wasserstein_per_band(a, b)
    for c in range(3):
        expected = scipy.stats.wasserstein_distance(a[..., c].ravel(), b[..., c].ravel())
        assert w[c] == pytest.approx(expected, rel=1e-9)
    assert np.allclose(dist.wasserstein_per_band(a + 10, a), 10.0)
    assert np.all(dist.wasserstein_per_band(a, a) == 0)


def test_band_moments_and_histograms() -> None:
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, size=(5, 8, 8, 3)).astype(np.uint8)
    m = dist.band_moments(a)
    flat = a.reshape(-1, 3).astype(float)
    assert np.allclose(m.mean, flat.mean(0)) and np.allclose(m.std, flat.std(0))
    assert np.all(m.p01 <= m.p99)
    h = dist.band_histograms(a, bins=32)
    assert h.shape == (3, 32) and np.allclose(h.sum(1), 1.0)
    assert np.allclose(h[:, 0], (a.reshape(-1, 3) < 8).mean(0))
    with pytest.raises(MetricInputError, match="bins"):
        dist.band_histograms(a, bins=30)


def test_feature_input_errors() -> None:
    with pytest.raises(MetricInputError, match="generated"):
        dist.prdc(np.zeros((3, 4)), np.zeros((10, 4)))
    with pytest.raises(MetricInputError, match="dimensions differ"):
        dist.kid(np.zeros((10, 4)), np.zeros((10, 5)))
    with pytest.raises(MetricInputError, match="NaN"):
        dist.frechet_distance(np.full((10, 4), np.nan), np.zeros((10, 4)))
