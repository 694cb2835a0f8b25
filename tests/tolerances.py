"""The tolerances of every floating-point comparison in the tests, each with its justification.

Floating-point results are not bit-identical across x86-64 machines: torch and numpy pick vectorised
kernels by CPU level (``ATEN_CPU_CAPABILITY`` default/avx2/avx512, numpy's own dispatch), and those
kernels round log/exp/pow, fused multiply-adds and matmul blockings differently in the last bits. So a
computed float is compared with a stored vector, or with another computation path, through a tolerance
from this module. Exact equality stays only where it holds by construction on any machine (integer or
uint8 data, file bytes, a copy, the same computation repeated in one process); each such assertion says
why in a comment where it is made.

Every tolerance here must also keep its meaning: the tests that use it check, where cheap, that a
deliberately wrong variant (shifted schedule, off-by-one grid, wrong sampler settings) fails it.
"""

from __future__ import annotations

import re

import numpy as np
import torch

# ---- float32 elementwise maths, counted in ulp ------------------------------------------------------------

#: ``linspace`` in float32 (schedule knots, the solver's time grid): ``start + i*step`` is a multiply and an
#: add whose product is no larger than the result, so it rounds by <= 0.5 ulp of the result; an FMA build
#: skips that rounding, the scalar (default-level) build does not: <= 1 ulp apart. Seen: 1 ulp at
#: ATEN_CPU_CAPABILITY=default on an AVX-512 machine. An off-by-one grid (1/1000 shifted) is ~10^5 ulp away.
LINSPACE_ULPS = 1

#: ``0.5·cumsum(log(1 − β))`` in float32 (the solver's log α knots). ``1 − β`` is one IEEE subtraction
#: (identical everywhere); ``log`` is SLEEF/glibc/SVML, each within 1 ulp, so two machines' terms differ by
#: <= 2 ulp(term) <= 2^-22·|term|; torch's CPU cumsum accumulates float32 in double, in order. The terms
#: share a sign, so the sums differ by < 2^-22·|S| < 4 ulp(S), and rounding both to float32 keeps them
#: <= 4 ulp apart. Seen: 1 ulp in 11 of 1000 knots on an AVX-512 Xeon. A schedule one linspace point off
#: is >= 9,000 ulp away, linear instead of scaled-linear betas ~3.7e6 ulp (tests/core/test_diffusion.py).
SCHEDULE_ULPS = 4

#: One float32 libm call (sin/cos/exp) on an exactly representable argument: within 1 ulp everywhere.
ELEMENTWISE_ULPS = 1

# ---- the reference vectors' own tolerances (../shared/reference/README.md and the JSON sidecars) -------
#
# Tests against the reference vectors read these from the sidecars with ``recommended()`` below, so a
# hidden set with its own sidecar governs itself: network forward atol=rtol=1e-4 (correct implementations
# <= 1.5e-6); sampler output atol=2e-3, rtol=1e-5 (correct <= 4.2e-4, every listed mistake >= 0.1);
# evaluation times atol=1e-6; autoencoder moments/decoded atol=rtol=1e-4 (correct <= 2.3e-6). The
# constants below are the same documented values, for tests that have no sidecar at hand.

#: Times of the sampler's evaluations (README section 2: "nfe_t should match to 1e-6").
SAMPLER_TIME_ATOL = 1e-6
#: Autoencoder moments and decoded images (README section 4).
AUTOENCODER_ATOL = AUTOENCODER_RTOL = 1e-4

#: On a GPU, kernels reduce in another order and sampling compounds that over every evaluation: 5x the
#: sidecar's fp32 sampling tolerance (2e-3 -> 1e-2) is still 10x below the smallest wrong variant (>= 0.1).
DEVICE_SAMPLING_SLACK = 5.0

# ---- uint8 images computed from floats ---------------------------------------------------------------------

#: An image quantised to uint8 from a float that differs in its last bits (another CPU level, another
#: batch size, a float64 instead of float32 stretch) moves by one code where the float sits on a
#: truncation or rounding edge. The reference README (§6, thumbnails) allows |diff| <= 1 on <= 0.1 % of
#: the values; the same rule serves images decoded from latents that agree to ~1e-6. A wrong image (other
#: seed, other row, other modality) differs by many codes almost everywhere.
UINT8_MAX_DIFF = 1
UINT8_MAX_FRACTION = 1e-3


def ulp_distance(actual, expected) -> np.ndarray:
    """Elementwise distance in float32 units in the last place (0 = bit-identical, sign-aware)."""

    def ordered(x) -> np.ndarray:
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        assert x.dtype == np.float32, f"ulp_distance compares float32, got {x.dtype}"
        bits = x.view(np.int32).astype(np.int64)
        return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # monotone in the float value

    a, b = ordered(actual), ordered(expected)
    assert a.shape == b.shape, (a.shape, b.shape)
    return np.abs(a - b)


def assert_ulp_close(actual, expected, ulps: int, what: str = "") -> None:
    """Float32 arrays within ``ulps`` units in the last place of each other, elementwise."""
    dist = ulp_distance(actual, expected)
    worst = int(dist.max()) if dist.size else 0
    bad = int((dist > ulps).sum())
    assert worst <= ulps, f"{what}: {bad} of {dist.size} values > {ulps} ulp apart (max {worst})"


def assert_uint8_close(actual, expected, what: str = "") -> None:
    """uint8 arrays equal up to the last-bit quantisation rule above (|diff| <= 1 on <= 0.1 % of values)."""
    a, b = np.asarray(actual), np.asarray(expected)
    assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    worst, fraction = int(diff.max()) if diff.size else 0, float((diff > 0).mean()) if diff.size else 0.0
    assert worst <= UINT8_MAX_DIFF and fraction <= UINT8_MAX_FRACTION, (
        f"{what}: max |diff| {worst} (allowed {UINT8_MAX_DIFF}), {fraction:.2%} of values differ "
        f"(allowed {UINT8_MAX_FRACTION:.1%})"
    )


def recommended(sidecar: dict, key: str, name: str = "atol") -> float:
    """A tolerance from a sidecar's ``tolerances.recommended[key]`` text, e.g. 'atol=1e-4, rtol=1e-4'."""
    text = sidecar["tolerances"]["recommended"][key]
    match = re.search(rf"{name}\s*=\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)", text)
    assert match, f"no {name} in recommended tolerance {key!r}: {text!r}"
    return float(match.group(1))
