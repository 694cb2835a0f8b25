"""Half-lives with bootstrap CIs over cells, chance-level pairing, and the set-metric bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from copgen.metrics import distribution
from copgen.metrics.halflife import HalfLifeError, chance_levels, chance_partners, half_life, half_life_ci
from copgen.metrics.set_ci import _frechet_low_rank, set_metric_cis


def test_half_life_ci_collapses_for_identical_cells_and_brackets_the_estimate():
    ks = [1, 2, 3, 4]
    series = np.array([0.8, 0.6, 0.35, 0.2])  # ratio 0.4375 at k=3
    same = np.tile(series, (6, 1))
    ci = half_life_ci(ks, same, floor=0.0)
    assert (ci.k_half, ci.low, ci.high) == (3, 3, 3)  # every resample is the same series
    assert ci.text(4) == "3"
    rng = np.random.default_rng(1)
    noisy = same + rng.normal(0, 0.12, same.shape)
    ci = half_life_ci(ks, noisy, floor=0.0, values=series.tolist(), seed=2)
    inf = 99
    low, high = (inf if v is None else v for v in (ci.low, ci.high))
    assert ci.k_half == 3 and low <= 3 <= high
    assert ci.text(4).startswith("3 [") or ci.text(4) == "3"


def test_half_life_ci_not_reached_reads_beyond_k():
    ci = half_life_ci([1, 2], np.array([[0.8, 0.7], [0.8, 0.75]]), floor=0.0)
    assert ci.k_half is None and ci.high is None and ci.text(2) == "not reached (> 2)"
    with pytest.raises(HalfLifeError, match="equals the floor"):
        half_life([1, 2], [0.5, 0.4], floor=0.5)


def test_chance_partners_pair_different_cells():
    cells = ["a", "a", "b", "c", "c"]
    partners = chance_partners(cells)
    assert all(cells[i] != cells[p] for i, p in enumerate(partners))
    assert chance_partners(["a", "a"]) is None
    real = np.arange(5, dtype=float)[:, None]
    levels = chance_levels(real, partners, {"diff": lambda a, b: np.abs(a - b)[:, 0]})
    expected = np.mean(np.abs(real[:, 0] - real[partners, 0]))
    assert levels["diff"] == expected  # exact: the same numpy mean of the same values


def test_set_metric_cis_low_rank_fd_and_bootstrap():
    rng = np.random.default_rng(0)
    fake, real = rng.normal(size=(21, 64)), rng.normal(size=(23, 64)) + 0.3
    # the same FD as distribution.frechet_distance, summed in another order: float64 rounding only
    assert _frechet_low_rank(fake, real) == pytest.approx(distribution.frechet_distance(fake, real), rel=1e-9)
    cells = [f"c{i // 2}" for i in range(21)]  # two samples per cell: cells are resampled whole
    cis = set_metric_cis(fake, real, cells, n_resamples=50, seed=3)
    assert set(cis) == {"fd", "kid", "precision", "recall", "coverage", "diversity"}
    assert all(lo <= hi for lo, hi in cis.values())
    assert cis == set_metric_cis(fake, real, cells, n_resamples=50, seed=3)  # seeded: same process, same
    assert set_metric_cis(fake, real, ["a"] * 10 + ["b"] * 11) == {}  # two cells: no interval
