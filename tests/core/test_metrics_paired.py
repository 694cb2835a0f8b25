"""Paired metrics against scikit-image / scipy compositions and constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from copgen.metrics import paired
from copgen.metrics.errors import MetricInputError
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.transform import downscale_local_mean
from tolerances import assert_uint8_close


def _textured(rng: np.random.Generator, n: int, h: int, w: int, c: int = 3) -> np.ndarray:
    """Smooth structure plus noise, so SSIM is neither ~0 nor ~1."""
    base = gaussian_filter(rng.normal(size=(n, h, w, c)), sigma=(0, 4, 4, 0)) * 400 + 128
    return np.clip(base + rng.normal(scale=12, size=base.shape), 0, 255).astype(np.uint8)


def _perturb(rng: np.random.Generator, x: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(x + rng.normal(scale=scale, size=x.shape), 0, 255).astype(np.uint8)


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    kwargs = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 255}
    if a.ndim == 3:
        kwargs["channel_axis"] = -1
    return structural_similarity(a, b, **kwargs)


@pytest.mark.parametrize("shape", [(3, 37, 53, 3), (2, 64, 64, 1)])
def test_psnr_and_ssim_match_scikit_image(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    target = _textured(rng, *shape)
    pred = _perturb(rng, target, 20)
    ours_psnr = paired.psnr(pred, target)
    ours_ssim = paired.ssim(pred, target)
    for i in range(shape[0]):
        a, b = pred[i], target[i]
        if shape[-1] == 1:  # skimage takes grey images without a channel axis
            a, b = a[..., 0], b[..., 0]
        assert ours_psnr[i] == pytest.approx(peak_signal_noise_ratio(b, a, data_range=255), abs=1e-10)
        assert ours_ssim[i] == pytest.approx(_skimage_ssim(a, b), abs=1e-10)
    assert 0.1 < ours_ssim.mean() < 0.95  # a non-trivial case


def test_ssim_float32_path_is_close() -> None:
    rng = np.random.default_rng(2)
    target = _textured(rng, 2, 48, 48)
    pred = _perturb(rng, target, 15)
    import torch

    assert np.allclose(paired.ssim(pred, target, dtype=torch.float32), paired.ssim(pred, target), atol=1e-4)


def test_psnr_identical_is_inf_unless_capped() -> None:
    x = _textured(np.random.default_rng(3), 2, 16, 16)
    assert np.all(np.isinf(paired.psnr(x, x)))
    assert np.all(paired.psnr(x, x, max_db=90.0) == 90.0)


def _reference_ms_ssim(a: np.ndarray, b: np.ndarray, scales: int) -> float:
    """Independent MS-SSIM of one (H, W, C) pair from scipy's Gaussian filter and skimage pooling."""
    weights = np.array(paired.MS_SSIM_WEIGHTS[:scales]) / sum(paired.MS_SSIM_WEIGHTS[:scales])
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_channel = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        terms = []
        for s in range(scales):
            f = lambda z: gaussian_filter(z, sigma=1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731
            ux, uy = f(x), f(y)
            vx, vy, vxy = f(x * x) - ux**2, f(y * y) - uy**2, f(x * y) - ux * uy
            cs = (2 * vxy + c2) / (vx + vy + c2)
            lum = (2 * ux * uy + c1) / (ux**2 + uy**2 + c1)
            terms.append((lum * cs).mean() if s == scales - 1 else cs.mean())
            x, y = downscale_local_mean(x, (2, 2)), downscale_local_mean(y, (2, 2))
        per_channel.append(np.prod(np.maximum(terms, 0) ** weights))
    return float(np.mean(per_channel))


def test_ms_ssim_matches_independent_composition_at_five_scales() -> None:
    rng = np.random.default_rng(4)
    target = _textured(rng, 2, 192, 192)
    pred = _perturb(rng, target, 25)
    assert paired.ms_ssim_scales(192, 192) == 5
    ours = paired.ms_ssim(pred, target)
    for i in range(2):
        assert ours[i] == pytest.approx(_reference_ms_ssim(pred[i], target[i], 5), abs=1e-10)
    assert np.allclose(paired.ms_ssim(target, target), 1.0)


def test_ms_ssim_scale_rule_and_small_images() -> None:
    win = paired.gaussian_window().numel()
    assert paired.ms_ssim_scales(win * 16, win * 16) == 5
    assert paired.ms_ssim_scales(win * 16 - 1, 400) == 4
    assert paired.ms_ssim_scales(win - 1, 400) == 0
    rng = np.random.default_rng(5)
    small = _textured(rng, 2, 16, 16)
    other = _perturb(rng, small, 20)
    # One scale fits: MS-SSIM with renormalised weights is plain SSIM.
    assert np.allclose(paired.ms_ssim(other, small), paired.ssim(other, small), atol=1e-12)
    medium = _textured(rng, 1, 64, 64)
    assert np.isnan(paired.ms_ssim(medium, medium, allow_fewer_scales=False)).all()
    tiny = _textured(rng, 1, win - 1, win - 1)
    assert np.isnan(paired.ms_ssim(tiny, tiny)).all()


def _forward_s2(reflectance: np.ndarray) -> np.ndarray:
    return (np.clip(paired.S2_GAIN * reflectance**paired.S2_GAMMA, 0, 1) * 255).astype(np.uint8)


def test_s2_inversion_brackets_the_reference_reflectance(reference_dir) -> None:
    ref = np.load(reference_dir / "thumbnails_reference.npz")
    bands = np.stack([ref["s2_B04"], ref["s2_B03"], ref["s2_B02"]], axis=-1).astype(np.float64) / 10000.0
    thumb = ref["s2_thumb"]
    # our forward model is the reference stretch; float64 pow differs across CPUs (numpy dispatches by
    # CPU level) in the last bits, which can move a truncated code: the reference README's uint8 rule
    assert_uint8_close(_forward_s2(bands), thumb, "S2 forward stretch")
    lower, valid = paired.s2_reflectance(thumb[None])
    upper, _ = paired.s2_reflectance(np.minimum(thumb.astype(np.int64) + 1, 255).astype(np.uint8)[None])
    lower, upper, valid = lower[0], upper[0], valid[0]
    assert valid.sum() > 0.5 * valid.size
    assert np.array_equal(valid, np.all((thumb > 0) & (thumb < 255), axis=-1))  # from uint8 codes: exact
    # Truncation: the true reflectance lies in [invert(v), invert(v + 1)) for every uncensored pixel.
    tol = 1e-12
    assert np.all(lower[valid] <= bands[valid] + tol)
    assert np.all(bands[valid] < upper[valid] + tol)


def test_s2_inversion_round_trips_every_code() -> None:
    codes = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    reflectance, valid = paired.s2_reflectance(codes)
    back = _forward_s2(reflectance + 1e-12)  # nudge off the bin edge the float power lands on
    assert np.array_equal(back, codes)  # exact: the 1e-12 nudge is ~1e4 times any ulp-level pow difference
    assert not valid[0].reshape(-1)[0] and not valid[0].reshape(-1)[255] and valid[0].reshape(-1)[1:255].all()


def test_sam_zero_for_identical_and_scaled_spectra() -> None:
    rng = np.random.default_rng(6)
    a = rng.integers(1, 128, size=(3, 20, 20, 3)).astype(np.uint8)
    assert np.all(paired.sam(a, a) == 0.0)  # exact: |a|^2 |b|^2 - (a.b)^2 is s*s - s*s
    # Doubling the code scales reflectance by 2**(1/0.6) in every band: same spectral direction.
    b = (a.astype(np.int64) * 2).astype(np.uint8)
    assert np.all(paired.sam(b, a) < 1e-7)
    spectra_a = np.array([1.0, 0.0, 0.0]).reshape(1, 1, 1, 3)
    spectra_b = np.array([1.0, 1.0, 0.0]).reshape(1, 1, 1, 3)
    assert paired.spectral_angle(spectra_a, spectra_b)[0] == pytest.approx(math.pi / 4, abs=1e-15)
    assert paired.spectral_angle(spectra_a, spectra_a * 7.5)[0] == 0.0  # exact in IEEE: 56.25 - 7.5**2


def test_ergas_known_values() -> None:
    target = np.full((1, 8, 8, 3), 0.0) + np.array([0.1, 0.2, 0.3])
    assert paired.ergas(target * 1.1, target)[0] == pytest.approx(10.0, rel=1e-12)
    # Through the uint8 path: constant codes per band, expected value from the inversion formula.
    vt, vp = np.array([100, 120, 140]), np.array([110, 120, 130])
    thumb_t = np.broadcast_to(vt, (2, 12, 12, 3)).astype(np.uint8).copy()
    thumb_p = np.broadcast_to(vp, (2, 12, 12, 3)).astype(np.uint8).copy()
    r = lambda v: (v / 255 / 1.3) ** (1 / 0.6)  # noqa: E731
    expected = 100 * np.sqrt(np.mean(((r(vp) - r(vt)) / r(vt)) ** 2))
    assert np.allclose(paired.s2_ergas(thumb_p, thumb_t), expected, rtol=1e-12)
    # Censored pixels are masked: saturating some pixels of a constant image leaves ERGAS unchanged.
    thumb_p[0, :3, :3, 1] = 255
    thumb_t[1, 5:, 5:, 0] = 0
    assert np.allclose(paired.s2_ergas(thumb_p, thumb_t), expected, rtol=1e-12)
    saturated = np.full((1, 12, 12, 3), 255, dtype=np.uint8)
    assert np.isnan(paired.s2_ergas(saturated, saturated)).all()
    assert np.isnan(paired.sam(saturated, saturated)).all()


def test_gradient_orientation_on_reference_hillshade(reference_dir) -> None:
    ref = np.load(reference_dir / "thumbnails_reference.npz")
    shade = ref["dem_b_hillshade"]
    batch = np.stack([shade, shade])
    assert np.allclose(paired.gradient_orientation_agreement(batch, batch), 1.0)
    inverted = 255 - batch
    assert np.allclose(paired.gradient_orientation_agreement(inverted, batch), -1.0)
    transposed = np.stack([shade.T, shade.T])  # same texture, different orientation
    value = paired.gradient_orientation_agreement(transposed, batch)
    assert np.all(np.abs(value) < 0.9)
    flat = np.full_like(batch, 128)
    assert np.isnan(paired.gradient_orientation_agreement(flat, batch)).all()


def test_bad_inputs_name_the_argument() -> None:
    x = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(MetricInputError, match="pred"):
        paired.psnr(x.astype(np.float32), x)
    with pytest.raises(MetricInputError, match="differ in shape"):
        paired.ssim(x, x[:, :8])
    with pytest.raises(MetricInputError, match="target"):
        paired.ssim(x, np.zeros((2, 16, 16, 4), dtype=np.uint8))
