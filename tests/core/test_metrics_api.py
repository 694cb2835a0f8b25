"""evaluate_modality: which metrics apply per modality, row format, per-sample rows, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from copgen.metrics import (
    ROW_KEYS,
    MetricInputError,
    band_names,
    evaluate_modality,
    psnr_ceiling,
)
from copgen.metrics.features import RandomConvFeatures
from copgen.modalities import Modality
from scipy.ndimage import gaussian_filter


def _batch(seed: int, n: int = 8, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(n, size, size, 3)), sigma=(0, 3, 3, 0)) * 300 + 120
    return np.clip(field + rng.normal(scale=10, size=field.shape), 1, 254).astype(np.uint8)


@pytest.fixture(scope="module")
def extractor() -> RandomConvFeatures:
    return RandomConvFeatures()


def _summary(rows: list[dict], metric: str, comparison: str) -> dict:
    (row,) = [
        r for r in rows if r["metric"] == metric and r["comparison"] == comparison and r["sample"] is None
    ]
    return row


def test_s2_rows(extractor: RandomConvFeatures) -> None:
    gen, real = _batch(0), _batch(1)
    cells = [f"c{i // 2}" for i in range(8)]
    rows = evaluate_modality("S2L2A", gen, real=real, previous=gen, reference=_batch(2), extractor=extractor,
                             cells=cells, n_resamples=200, kid_subsets=10)
    assert all(tuple(r) == ROW_KEYS for r in rows)
    metrics = {r["metric"] for r in rows}
    assert {"psnr", "ssim", "ms_ssim", "sam", "ergas", "fd", "kid", "precision", "recall", "f1",
            "density", "coverage", "diversity"} <= metrics
    assert "gradient_orientation" not in metrics
    # Against itself (the previous iteration) every paired metric is at its ideal value.
    assert _summary(rows, "psnr", "previous")["value"] == pytest.approx(psnr_ceiling(32, 32, 3))
    assert _summary(rows, "ssim", "previous")["value"] == pytest.approx(1.0)
    assert _summary(rows, "sam", "previous")["value"] == 0.0
    real_ssim = _summary(rows, "ssim", "real")
    assert real_ssim["ci_low"] <= real_ssim["value"] <= real_ssim["ci_high"] and real_ssim["n"] == 8
    per_sample = [
        r for r in rows if r["metric"] == "ssim" and r["comparison"] == "real" and r["sample"] is not None
    ]
    assert [r["cell"] for r in per_sample] == cells
    assert np.mean([r["value"] for r in per_sample]) == pytest.approx(real_ssim["value"])
    fd = _summary(rows, "fd", "reference")
    assert fd["feature_extractor"] == extractor.identity and fd["value"] > 0
    assert real_ssim["feature_extractor"] is None
    assert len([r for r in rows if r["metric"] == "nearest_reference_distance"]) == 8
    for band in band_names(Modality.S2L2A):
        hist = [r["value"] for r in rows if r["metric"] == f"hist/{band}"]
        assert math.isclose(sum(hist), 1.0)


def test_dem_rows_without_reference() -> None:
    gen = _batch(3)
    rows = evaluate_modality(Modality.DEM, gen, real=_batch(4), per_sample=False, n_resamples=100)
    metrics = {r["metric"] for r in rows}
    assert "gradient_orientation" in metrics and "sam" not in metrics and "fd" not in metrics
    assert all(r["sample"] is None for r in rows)
    assert {r["metric"] for r in rows if r["metric"].startswith("band_mean/")} == {"band_mean/hillshade"}


def test_reference_features_are_reused(extractor: RandomConvFeatures) -> None:
    gen, ref = _batch(5), _batch(6)
    direct = evaluate_modality("S1RTC", gen, reference=ref, extractor=extractor, kid_subsets=5)
    cached = evaluate_modality("S1RTC", gen, reference_features=extractor(ref), extractor=extractor,
                               kid_subsets=5)
    assert _summary(direct, "fd", "reference")["value"] == _summary(cached, "fd", "reference")["value"]
    assert not any(r["metric"].startswith("wasserstein1/") for r in cached)  # needs reference pixels


def test_bad_batches_name_batch_and_modality() -> None:
    gen = _batch(7)
    with pytest.raises(MetricInputError, match=r"real.*S2L1C"):
        evaluate_modality("S2L1C", gen, real=_batch(8, size=24))
    with pytest.raises(MetricInputError, match=r"generated.*DEM"):
        evaluate_modality("DEM", gen.astype(np.float32))
    with pytest.raises(MetricInputError, match="cells"):
        evaluate_modality("DEM", gen, cells=["a"])
