"""Bootstrap CIs: coverage, width, determinism, cluster resampling and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from copgen.metrics.bootstrap import bootstrap_mean_ci


def test_large_sample_ci_contains_mean_with_expected_width() -> None:
    values = np.random.default_rng(0).normal(3.0, 1.0, size=5000)
    result = bootstrap_mean_ci(values, seed=1)
    assert result.n == 5000 and result.value == pytest.approx(values.mean())
    assert result.ci_low < 3.0 < result.ci_high
    expected_width = 2 * 1.959964 * values.std() / math.sqrt(values.size)
    assert result.ci_high - result.ci_low == pytest.approx(expected_width, rel=0.15)


def test_coverage_is_near_nominal() -> None:
    rng = np.random.default_rng(5)
    hits = sum(
        (r := bootstrap_mean_ci(rng.exponential(2.0, size=60), n_resamples=500, seed=i)).ci_low
        < 2.0
        < r.ci_high
        for i in range(200)
    )
    assert 0.85 <= hits / 200 <= 0.99


def test_deterministic_for_a_seed() -> None:
    values = np.random.default_rng(2).normal(size=50)
    assert bootstrap_mean_ci(values, seed=7) == bootstrap_mean_ci(values, seed=7)
    assert bootstrap_mean_ci(values, seed=7) != bootstrap_mean_ci(values, seed=8)


def test_cells_are_resampled_together() -> None:
    # Four patches per cell with identical values: resampling cells equals resampling the cell means.
    cell_means = np.random.default_rng(3).normal(size=30)
    values = np.repeat(cell_means, 4)
    cells = np.repeat([f"cell{i:02d}" for i in range(30)], 4)  # sorted = cell order
    grouped = bootstrap_mean_ci(values, groups=cells, seed=4)
    assert grouped.n == 120
    by_mean = bootstrap_mean_ci(cell_means, seed=4)
    assert (grouped.value, grouped.ci_low, grouped.ci_high) == pytest.approx(
        (by_mean.value, by_mean.ci_low, by_mean.ci_high)
    )
    # Treating the 120 patches as independent understates the uncertainty.
    naive = bootstrap_mean_ci(values, seed=4)
    assert naive.ci_high - naive.ci_low < 0.75 * (grouped.ci_high - grouped.ci_low)


def test_non_finite_dropped_and_degenerate_cases() -> None:
    result = bootstrap_mean_ci(np.array([1.0, np.nan, 3.0, np.inf]), seed=0)
    assert result.n == 2 and result.value == 2.0
    empty = bootstrap_mean_ci(np.array([np.nan]))
    assert empty.n == 0 and math.isnan(empty.value) and math.isnan(empty.ci_low)
    single = bootstrap_mean_ci(np.array([4.5]))
    assert (single.value, single.ci_low, single.ci_high, single.n) == (4.5, 4.5, 4.5, 1)
