"""Bootstrap CIs of the set metrics (FD, KID, precision, recall, coverage, diversity) over generated cells.

The generated set is resampled by cell with replacement, the reference set held fixed, and each metric
recomputed; the interval is the 2.5-97.5 percentile range. Resampling with replacement duplicates
samples, which biases set metrics slightly (duplicates shrink diversity and k-NN radii): the interval
says how much the value moves with the choice of cells, not an exact coverage guarantee.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from copgen.metrics import distribution

SET_CI_METRICS = ("fd", "kid", "precision", "recall", "coverage", "diversity")


def set_metric_cis(generated: np.ndarray, reference: np.ndarray, cells: Sequence[str] | None, *,
                   n_resamples: int = 200, seed: int = 0,
                   kid_subsets: int = 10) -> dict[str, tuple[float, float]]:
    """``{metric: (ci_low, ci_high)}`` for :data:`SET_CI_METRICS` from feature matrices (N, D)."""
    fake = np.asarray(generated, dtype=np.float64)
    labels = np.asarray(cells if cells is not None else np.arange(len(fake)))
    _, group = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(group == g) for g in range(group.max() + 1)]
    if len(members) < 3 or n_resamples < 1:  # a bootstrap over two cells says nothing
        return {}
    real = np.asarray(reference, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in SET_CI_METRICS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny products: thread start-up would cost more than the work
    try:
        for _ in range(n_resamples):
            picked = rng.integers(0, len(members), size=len(members))
            f = fake[np.concatenate([members[g] for g in picked])]
            draws["fd"].append(_frechet_low_rank(f, real))
            draws["kid"].append(distribution.kid(f, real, n_subsets=kid_subsets, seed=seed)[0])
            scores = distribution.prdc(f, real)
            for m in ("precision", "recall", "coverage"):
                draws[m].append(getattr(scores, m))
            draws["diversity"].append(distribution.diversity(f))
    finally:
        torch.set_num_threads(threads)
    return {m: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for m, v in draws.items()}


def _frechet_low_rank(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance without any D x D matrix: tr(cov) is the centred squared norm over (n-1), and
    the cross term the exact low-rank form of ``distribution.trace_sqrt_product_from_features``."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    diff = a.mean(0) - b.mean(0)
    value = (diff @ diff + (ca * ca).sum() / (len(a) - 1) + (cb * cb).sum() / (len(b) - 1)
             - 2.0 * distribution.trace_sqrt_product_from_features(a, b))
    return max(float(value), 0.0)
