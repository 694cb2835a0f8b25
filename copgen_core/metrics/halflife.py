"""How fast a self-loop forgets its start: half-lives of paired similarity, chance levels, and their CIs.

The paired metrics of iteration k compare the generated tile with the real tile of the same cell. As the
loop runs, they fall towards the value two *unrelated* real tiles of the same modality have — the chance
level. The half-life measures the fall above that floor (:data:`HALF_LIFE_DEFINITION`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from copgen.errors import CopgenError

# Paired metrics whose chance level is 0 by construction (structure/orientation agreement of unrelated
# images): their half-life is the plain half. The others (PSNR, SAM, ERGAS) have no natural zero: their
# half-life is measured on the excess over the value of unrelated real pairs of the same modality.
ZERO_FLOOR_METRICS = frozenset({"ssim", "ms_ssim", "gradient_orientation"})
HALF_LIFE_DEFINITION = (
    "Half-life k½: the first iteration k after k₁ (the first iteration where the modality was generated) "
    "at which the paired similarity to the real cell has lost half of what it had at k₁, measured above "
    "a floor f: (m(k) − f) / (m(k₁) − f) ≤ 0.5. For SSIM, MS-SSIM and gradient-orientation agreement "
    "f = 0 (plain half: unrelated images score ≈ 0). PSNR (dB), SAM and ERGAS have no natural zero (half "
    "of a dB value means nothing), so f = their chance level: the mean value between real images of "
    "different cells of the same modality (k=0 tiles of the cube, each paired with the next cell). The "
    "ratio is direction-free, so it works for SAM/ERGAS, where lower is better. “not reached” = the "
    "ratio stayed above 0.5 up to the last iteration.")


class HalfLifeError(CopgenError, ValueError):
    """A half-life cannot be measured from the given series (the message says which value and why)."""


def half_life(iterations: Sequence[int], values: Sequence[float], floor: float) -> tuple[int | None, float]:
    """``(k½, retained fraction at the last k)`` of one paired-vs-real series (see HALF_LIFE_DEFINITION).

    ``iterations`` ascending, the first being k₁. ``k½`` is None when the ratio never falls to 0.5.
    """
    if len(iterations) != len(values) or not len(iterations):
        raise HalfLifeError(f"half_life: {len(iterations)} iterations for {len(values)} values")
    span = values[0] - floor
    if not math.isfinite(span) or span == 0:
        raise HalfLifeError(f"half_life: the value at k={iterations[0]} ({values[0]}) equals the floor "
                            f"{floor}")
    ratios = [(v - floor) / span for v in values]
    k_half = next((k for k, r in zip(iterations[1:], ratios[1:], strict=True) if r <= 0.5), None)
    return k_half, float(ratios[-1])


@dataclass(frozen=True)
class HalfLifeCI:
    """k½ and its 95% bootstrap interval over cells; ``None`` bounds mean "not reached" (beyond k_last)."""

    k_half: int | None
    low: int | None
    high: int | None
    retained_last: float
    n_cells: int

    def text(self, k_last: int) -> str:
        """``3 [2, 5]``; "not reached" and a bound past the last iteration read ``> K``."""
        def one(k: int | None) -> str:
            return f"> {k_last}" if k is None else str(k)
        if self.k_half is None and self.low is None:
            return f"not reached (> {k_last})"
        if self.low == self.high == self.k_half:
            return one(self.k_half)
        return f"{one(self.k_half)} [{one(self.low)}, {one(self.high)}]"


def half_life_ci(iterations: Sequence[int], per_cell: np.ndarray, floor: float, *,
                 values: Sequence[float] | None = None, n_resamples: int = 1000, seed: int = 0) -> HalfLifeCI:
    """k½ of ``values`` (default: the mean series of ``per_cell`` (cells, iterations)) and a percentile
    bootstrap interval over cells (cells resampled with replacement; the floor is held fixed). A resample
    whose mean is at the floor at k₁ counts as "not reached". NaN entries (a cell missing an iteration)
    are ignored in means."""
    x = np.asarray(per_cell, dtype=float)
    if x.ndim != 2 or x.shape[1] != len(iterations) or not x.shape[0]:
        raise HalfLifeError(f"half_life_ci: values of shape {x.shape} for {len(iterations)} iterations")
    center = list(values) if values is not None else np.nanmean(x, axis=0).tolist()
    k_half, retained = half_life(iterations, center, floor)
    beyond = max(iterations) + 1  # "not reached" sorts after every iteration
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, x.shape[0], size=(n_resamples, x.shape[0]))
    means = np.nanmean(x[picks], axis=1)  # (resamples, iterations)
    spans = means[:, 0] - floor
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (means - floor) / spans[:, None]
    crossed = (ratios[:, 1:] <= 0.5) & np.isfinite(ratios[:, 1:]) & (spans[:, None] != 0)
    ks = np.asarray(iterations[1:], dtype=int)
    first = np.full(n_resamples, beyond)
    if len(ks):
        first = np.where(crossed.any(axis=1), ks[np.argmax(crossed, axis=1)], beyond)
    low, high = (int(v) for v in np.percentile(first, [2.5, 97.5], method="inverted_cdf"))
    return HalfLifeCI(k_half, None if low >= beyond else low, None if high >= beyond else high, retained,
                      int(x.shape[0]))


def chance_partners(cells: Sequence[str]) -> np.ndarray | None:
    """For each sample, the index of the next sample (cyclic) from another cell; None with < 2 cells."""
    n = len(cells)
    if len(set(cells)) < 2:
        return None
    return np.asarray([next(j % n for j in range(i + 1, i + n) if cells[j % n] != cells[i])
                       for i in range(n)])


def chance_levels(real: np.ndarray, partners: np.ndarray,
                  functions: dict[str, Callable[[Any, Any], np.ndarray]]) -> dict[str, float]:
    """Mean paired metrics between real tiles of different cells (``real[i]`` vs ``real[partners[i]]``):
    the value a loop that forgot its start entirely would score."""
    out = {}
    for metric, function in functions.items():
        values = np.asarray(function(real, real[partners]), dtype=float)
        if np.isfinite(values).any():
            out[metric] = float(np.nanmean(values))
    return out
