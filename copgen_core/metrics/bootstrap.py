"""Percentile bootstrap confidence intervals of a mean, over cells (seeded and vectorised)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from copgen.metrics.errors import MetricInputError

# Resamples drawn per vectorised step: bounds the (resamples x groups) index matrix to ~32 MB.
_MAX_INDEX_ENTRIES = 4_000_000


@dataclass(frozen=True)
class BootstrapResult:
    """The point estimate (mean of the finite values), its CI bounds, and how many values it used."""

    value: float
    ci_low: float
    ci_high: float
    n: int


def bootstrap_mean_ci(
    values: np.ndarray,
    groups: np.ndarray | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Percentile bootstrap CI of the mean of ``values``, resampling whole groups (cells) if given.

    ``groups`` labels each value with its cell, so several patches of one cell are resampled together
    (they are not independent). Non-finite values (NaN from an undefined metric, inf from a PSNR of
    identical images) are dropped first; ``n`` counts the values kept. With no value left the result is
    all NaN and n=0; with one group the CI collapses to the value.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not 0.0 < confidence < 1.0:
        raise MetricInputError("confidence", f"must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise MetricInputError("n_resamples", f"must be >= 1, got {n_resamples}")
    if groups is None:
        group_ids = np.arange(values.size)
    else:
        groups = np.asarray(groups).reshape(-1)
        if groups.size != values.size:
            raise MetricInputError("groups", f"has {groups.size} labels for {values.size} values")
        _, group_ids = np.unique(groups, return_inverse=True)

    keep = np.isfinite(values)
    values, group_ids = values[keep], group_ids[keep]
    if values.size == 0:
        return BootstrapResult(float("nan"), float("nan"), float("nan"), 0)
    _, group_ids = np.unique(group_ids, return_inverse=True)
    sums = np.bincount(group_ids, weights=values)
    counts = np.bincount(group_ids).astype(np.float64)
    point = float(sums.sum() / counts.sum())
    n_groups = sums.size
    if n_groups == 1:
        return BootstrapResult(point, point, point, int(values.size))

    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    step = max(1, _MAX_INDEX_ENTRIES // n_groups)
    for start in range(0, n_resamples, step):
        stop = min(start + step, n_resamples)
        index = rng.integers(0, n_groups, size=(stop - start, n_groups))
        means[start:stop] = sums[index].sum(1) / counts[index].sum(1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return BootstrapResult(point, float(low), float(high), int(values.size))
