"""Cost of each metric per sample (ms) at 256 px, batch 64, and of the feature extractors.

Run: ``python benchmarks/metrics.py [--batch 64] [--size 256] [--threads 1] [--repeats 3]``.
Prints the best of ``--repeats`` timings per metric, per sample; distribution metrics are timed on
the extractor's features of the batch against a second batch (cost per generated sample).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from copgen.metrics import distribution, paired
from copgen.metrics.bootstrap import bootstrap_mean_ci
from copgen.metrics.errors import FeatureExtractorUnavailable
from copgen.metrics.features import InceptionPool3, RandomConvFeatures
from scipy.ndimage import gaussian_filter


def _images(seed: int, n: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = gaussian_filter(rng.normal(size=(n, size // 4, size // 4, 3)), sigma=(0, 2, 2, 0)) * 300 + 120
    field = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)
    return np.clip(field + rng.normal(scale=12, size=field.shape), 0, 255).astype(np.uint8)


def _best_ms_per_sample(fn: Callable[[], object], n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e3


def _set_metrics(fa: np.ndarray, fb: np.ndarray) -> dict[str, Callable[[], object]]:
    return {
        "fd": lambda: distribution.frechet_distance(fa, fb),
        "kid (100 subsets)": lambda: distribution.kid(fa, fb),
        "prdc (k=3)": lambda: distribution.prdc(fa, fb),
        "diversity": lambda: distribution.diversity(fa),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.batch
    a, b = _images(0, n, args.size), _images(1, n, args.size)
    print(f"batch {n} x {args.size}px, torch threads {args.threads}, best of {args.repeats}")
    print(f"{'metric':34s} ms/sample")
    timings: dict[str, Callable[[], object]] = {
        "psnr": lambda: paired.psnr(a, b),
        "ssim (float64)": lambda: paired.ssim(a, b),
        "ssim (float32)": lambda: paired.ssim(a, b, dtype=torch.float32),
        "ms_ssim (float64, 5 scales)": lambda: paired.ms_ssim(a, b),
        "sam (S2 inverted reflectance)": lambda: paired.sam(a, b),
        "ergas (S2 inverted reflectance)": lambda: paired.s2_ergas(a, b),
        "gradient_orientation (DEM)": lambda: paired.gradient_orientation_agreement(a, b),
        "wasserstein1 per band": lambda: distribution.wasserstein_per_band(a, b),
        "band moments + histograms": lambda: (distribution.band_moments(a), distribution.band_histograms(a)),
        "bootstrap CI (1000 resamples)": lambda: bootstrap_mean_ci(np.random.default_rng(0).normal(size=n)),
    }
    for name, fn in timings.items():
        print(f"{name:34s} {_best_ms_per_sample(fn, n, args.repeats):9.2f}")

    extractors: list[object] = [RandomConvFeatures()]
    try:
        extractors.append(InceptionPool3())
    except FeatureExtractorUnavailable as error:
        print(f"inception-pool3: not available ({error})")
    for extractor in extractors:
        fa = extractor(a)  # warm-up (TorchScript optimises on the first calls)
        print(f"features {extractor.name} (dim {extractor.dim}): "
              f"{_best_ms_per_sample(lambda e=extractor: e(a), n, args.repeats):9.2f}")
        fb = extractor(b)
        for name, fn in _set_metrics(fa, fb).items():
            label = f"  {name} on {extractor.name}"
            print(f"{label:34s} {_best_ms_per_sample(fn, n, args.repeats):9.2f}")


if __name__ == "__main__":
    main()
