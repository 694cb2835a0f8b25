"""Degradation metrics: paired, step-to-step and distribution metrics; feature extractors.

The flows call :func:`evaluate_modality` once per (iteration, modality) and append its rows to the
long metrics table. Each row is a dict with the keys of :data:`ROW_KEYS`:

- ``metric``: the metric name (``psnr``, ``ssim``, ``ms_ssim``, ``sam``, ``ergas``,
  ``gradient_orientation``, ``fd``, ``kid``, ``kid_std``, ``precision``, ``recall``, ``f1``,
  ``density``, ``coverage``, ``diversity``, ``diversity_reference``, ``nearest_reference_distance``,
  ``wasserstein1/<band>``, ``band_mean/<band>``, ``band_std/<band>``, ``band_p01/<band>``,
  ``band_p99/<band>``, ``hist/<band>``);
- ``comparison``: ``real`` (paired with the real image of the same sample), ``previous`` (paired with
  iteration k-1), ``reference`` (the generated set against the held-out real reference set) or ``self``
  (statistics of the generated set alone);
- ``value``, ``ci_low``, ``ci_high``, ``n``: summary rows of paired metrics carry a 95% percentile
  bootstrap CI of the mean over cells; ``kid`` carries mean -/+ one std over its subsets; other set
  metrics have no CI (NaN); ``n`` is the number of samples the value used;
- ``feature_extractor``: the extractor identity for feature-space metrics, None for pixel metrics;
- ``sample`` and ``cell``: None on summary rows; on per-sample rows the index in the batch and the cell
  label; ``bin``: the lower edge (uint8 value) of a histogram bin, None elsewhere.

Which metrics apply: PSNR, SSIM and MS-SSIM for every modality; SAM and ERGAS only for S2L1C/S2L2A
(the only invertible encoding); gradient-orientation agreement only for DEM (hillshades). Pixel
statistics use the bands of each encoding: S2 (B04, B03, B02), S1RTC (VV, VV+VH, VH), DEM one grey band.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from copgen.metrics import distribution, paired
from copgen.metrics.bootstrap import BootstrapResult, bootstrap_mean_ci
from copgen.metrics.errors import FeatureExtractorUnavailable, MetricInputError, as_uint8_batch
from copgen.metrics.features import FeatureExtractor, get_extractor
from copgen.modalities import Modality

__all__ = [
    "ROW_KEYS",
    "BootstrapResult",
    "FeatureExtractor",
    "FeatureExtractorUnavailable",
    "MetricInputError",
    "band_names",
    "bootstrap_mean_ci",
    "evaluate_modality",
    "get_extractor",
    "paired_metric_functions",
    "psnr_ceiling",
    "set_statistics_rows",
]

ROW_KEYS = (
    "modality", "metric", "comparison", "value", "ci_low", "ci_high", "n",
    "feature_extractor", "sample", "cell", "bin",
)  # fmt: skip

_BANDS = {
    Modality.DEM: ("hillshade",),
    Modality.S1RTC: ("VV", "VV+VH", "VH"),
    Modality.S2L1C: ("B04", "B03", "B02"),
    Modality.S2L2A: ("B04", "B03", "B02"),
}


def band_names(modality: Modality) -> tuple[str, ...]:
    """Names of the thumbnail bands pixel statistics are reported for."""
    return _BANDS[Modality.parse(modality)]


def psnr_ceiling(height: int, width: int, channels: int) -> float:
    """PSNR of the smallest non-zero error (one value off by one count): stands in for identical pairs.

    Keeps the summary finite and ordered when some pairs are identical (e.g. a fixed-seed attractor).
    """
    return 10.0 * math.log10(paired.DATA_RANGE**2 * height * width * channels)


def paired_metric_functions(
    modality: Modality, shape: tuple[int, int, int]
) -> dict[str, Callable[[Any, Any], np.ndarray]]:
    """The per-sample paired metrics that apply to a modality, by row name."""
    modality = Modality.parse(modality)
    ceiling = psnr_ceiling(*shape)
    functions: dict[str, Callable[[Any, Any], np.ndarray]] = {
        "psnr": lambda a, b: paired.psnr(a, b, max_db=ceiling),
        "ssim": paired.ssim,
        "ms_ssim": paired.ms_ssim,
    }
    if modality in (Modality.S2L1C, Modality.S2L2A):
        functions["sam"] = paired.sam
        functions["ergas"] = paired.s2_ergas
    if modality is Modality.DEM:
        functions["gradient_orientation"] = paired.gradient_orientation_agreement
    return functions


def _row(modality: Modality, metric: str, comparison: str, value: float, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(modality=modality.name, metric=metric, comparison=comparison, value=float(value),
               ci_low=math.nan, ci_high=math.nan, n=None)
    row.update(extra)
    return row


def _pixel_bands(modality: Modality, images: torch.Tensor) -> torch.Tensor:
    """DEM thumbnails are grey stored as RGB (lossy codecs make the channels differ by a count):
    reduce them to one band by the rounded channel mean."""
    if modality is Modality.DEM and images.shape[-1] == 3:
        return images.to(torch.float32).mean(-1, keepdim=True).round().to(torch.uint8)
    return images


def _paired_rows(
    modality: Modality,
    comparison: str,
    generated: torch.Tensor,
    target: torch.Tensor,
    cells: Sequence[str] | None,
    seed: int,
    n_resamples: int,
    per_sample: bool,
) -> list[dict[str, Any]]:
    if target.shape != generated.shape:
        raise MetricInputError(
            comparison, f"shape {tuple(target.shape)} differs from generated {tuple(generated.shape)}",
            f"modality {modality.name}",
        )
    rows = []
    for metric, function in paired_metric_functions(modality, tuple(generated.shape[1:])).items():
        values = function(generated, target)
        ci = bootstrap_mean_ci(values, groups=None if cells is None else np.asarray(cells),
                               n_resamples=n_resamples, seed=seed)
        rows.append(_row(modality, metric, comparison, ci.value, ci_low=ci.ci_low, ci_high=ci.ci_high,
                         n=ci.n))
        if per_sample:
            for i, v in enumerate(values):
                rows.append(_row(modality, metric, comparison, v, n=1, sample=i,
                                 cell=None if cells is None else cells[i]))
    return rows


def set_statistics_rows(
    modality: Modality | str | int, images: Any, comparison: str = "self", hist_bins: int = 32
) -> list[dict[str, Any]]:
    """Per-band mean/std/p01/p99 and normalised histograms of one set (the tails of research §2.3)."""
    modality = Modality.parse(modality)
    x = _pixel_bands(modality, as_uint8_batch(images, "images", f"modality {modality.name}"))
    names = band_names(modality)
    if x.shape[-1] != len(names):
        raise MetricInputError("images", f"{modality.name} has {len(names)} band(s), got {x.shape[-1]}")
    moments = distribution.band_moments(x)
    hist = distribution.band_histograms(x, bins=hist_bins)
    n = int(x.shape[0])
    rows = []
    for b, band in enumerate(names):
        for stat in ("mean", "std", "p01", "p99"):
            rows.append(_row(modality, f"band_{stat}/{band}", comparison, getattr(moments, stat)[b], n=n))
        width = 256 // hist_bins
        for k in range(hist_bins):
            rows.append(_row(modality, f"hist/{band}", comparison, hist[b, k], n=n, bin=k * width))
    return rows


def _distribution_rows(
    modality: Modality,
    generated: torch.Tensor,
    reference: torch.Tensor | None,
    reference_features: np.ndarray | None,
    extractor: FeatureExtractor,
    cells: Sequence[str] | None,
    seed: int,
    kid_subsets: int,
    per_sample: bool,
    set_ci_resamples: int = 0,
) -> list[dict[str, Any]]:
    identity = extractor.identity
    fake = extractor(generated)
    real = reference_features if reference_features is not None else extractor(reference)
    n = int(fake.shape[0])
    kid_mean, kid_std = distribution.kid(fake, real, n_subsets=kid_subsets, seed=seed)
    scores = distribution.prdc(fake, real)
    rows = [
        _row(modality, "fd", "reference", distribution.frechet_distance(fake, real), n=n,
             feature_extractor=identity),
        _row(modality, "kid", "reference", kid_mean, ci_low=kid_mean - kid_std, ci_high=kid_mean + kid_std,
             n=n, feature_extractor=identity),
        _row(modality, "kid_std", "reference", kid_std, n=n, feature_extractor=identity),
    ]
    for metric in ("precision", "recall", "f1", "density", "coverage"):
        rows.append(_row(modality, metric, "reference", getattr(scores, metric), n=n,
                         feature_extractor=identity))
    rows.append(_row(modality, "diversity", "self", distribution.diversity(fake), n=n,
                     feature_extractor=identity))
    rows.append(_row(modality, "diversity_reference", "reference", distribution.diversity(real),
                     n=int(real.shape[0]), feature_extractor=identity))
    if set_ci_resamples:  # replaces kid's mean -/+ std over subsets (near 0 when the subsets are the set)
        from copgen.metrics.set_ci import set_metric_cis

        cis = set_metric_cis(fake, real, cells, n_resamples=set_ci_resamples, seed=seed)
        for row in rows:
            if row["metric"] in cis:
                row["ci_low"], row["ci_high"] = cis[row["metric"]]
    if per_sample:
        for i, d in enumerate(scores.nearest_reference_distance):
            rows.append(_row(modality, "nearest_reference_distance", "reference", d, n=1, sample=i,
                             cell=None if cells is None else cells[i], feature_extractor=identity))
    if reference is not None:
        w1 = distribution.wasserstein_per_band(_pixel_bands(modality, generated),
                                               _pixel_bands(modality, reference))
        for band, value in zip(band_names(modality), w1, strict=True):
            rows.append(_row(modality, f"wasserstein1/{band}", "reference", value, n=n))
    return rows


def evaluate_modality(
    modality: Modality | str | int,
    generated: Any,
    real: Any | None = None,
    previous: Any | None = None,
    reference: Any | None = None,
    *,
    reference_features: np.ndarray | None = None,
    extractor: FeatureExtractor | None = None,
    cells: Sequence[str] | None = None,
    seed: int = 0,
    n_resamples: int = 1000,
    kid_subsets: int = 100,
    hist_bins: int = 32,
    per_sample: bool = True,
    set_ci_resamples: int = 0,
) -> list[dict[str, Any]]:
    """All metrics of one modality at one iteration, as long-format rows (see the module docstring).

    ``generated``, ``real`` (the real image of the same samples) and ``previous`` (iteration k-1 of the
    same samples) are uint8 batches (N, H, W, 3) or (N, H, W) in the same sample order. ``reference`` is
    the held-out real reference set (use the same N at every iteration); pass ``reference_features``
    instead (or as well) to reuse its cached features. Distribution metrics are computed only when a
    reference is given; paired ones only for the batches given. ``cells`` labels each sample with its
    grid cell: bootstrap CIs resample cells, and per-sample rows carry the label. ``set_ci_resamples``
    > 0 gives the set metrics bootstrap CIs over cells too (:mod:`copgen.metrics.set_ci`).
    ``extractor`` defaults to ``get_extractor("auto")``; pass one to avoid reloading it on every call.
    """
    modality = Modality.parse(modality)
    context = f"modality {modality.name}"
    gen = as_uint8_batch(generated, "generated", context)
    if cells is not None and len(cells) != gen.shape[0]:
        raise MetricInputError("cells", f"{len(cells)} labels for {gen.shape[0]} samples", context)
    rows: list[dict[str, Any]] = []
    for comparison, batch in (("real", real), ("previous", previous)):
        if batch is not None:
            target = as_uint8_batch(batch, comparison, context)
            rows += _paired_rows(modality, comparison, gen, target, cells, seed, n_resamples, per_sample)
    if reference is not None or reference_features is not None:
        ref = None if reference is None else as_uint8_batch(reference, "reference", context)
        rows += _distribution_rows(modality, gen, ref, reference_features, extractor or get_extractor("auto"),
                                   cells, seed, kid_subsets, per_sample, set_ci_resamples)
    rows += set_statistics_rows(modality, gen, "self", hist_bins)
    return rows
