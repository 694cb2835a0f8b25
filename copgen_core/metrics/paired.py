"""Paired metrics between two uint8 thumbnail batches of the same samples (generated vs real, or k vs k-1).

Every function takes ``pred`` and ``target`` of shape (B, H, W, 3) (or (B, H, W) grey) uint8 and returns
a float64 numpy array of shape (B,): one value per sample, so confidence intervals can be bootstrapped
over cells. ``target`` is the reference of the pair (the real image, or iteration k-1).

Conventions (fixed so that reports are unambiguous):

- PSNR: data range 255, MSE over all pixels and channels of a sample; identical images give ``inf``
  (as scikit-image), unless ``max_db`` caps it.
- SSIM: Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5, truncated at 3.5 sigma), K1=0.01,
  K2=0.03, data range 255, population (not sample) covariance, computed per channel and averaged over the
  channels; the SSIM map is averaged over the *valid* region only (a 5-px border is dropped). This equals
  ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255, channel_axis=-1)``.
- MS-SSIM: Wang et al. 2003 with the usual 5 scale weights, the same window, 2x2 average pooling between
  scales (an odd last row/column is dropped), contrast-structure terms clamped at 0 before the fractional
  powers (as pytorch-msssim), per channel then averaged. Every scale must hold one full 11-px window, so
  5 scales need a smaller side of at least 11*2**4 = 176 px (pytorch-msssim asserts > 160 but then skips
  smoothing at the coarsest scale; we do not). Smaller images use as many scales as fit, with the
  weights renormalised to sum to 1 (``allow_fewer_scales=True``) or give NaN; sides < 11 px give NaN.
- SAM and ERGAS (S2 only): on reflectance recovered by inverting the Major TOM thumbnail stretch
  (:func:`s2_reflectance`). Pixels that are 0 or 255 in any band of either image are censored and
  masked. SAM is the mean spectral angle in radians over the valid pixels; ERGAS uses ratio h/l = 1
  (same-resolution translation; the pansharpening default of 4 does not apply):
  ``100 * sqrt(mean_b (RMSE_b / mean_b(target))**2)``. A sample with no valid pixel gives NaN.
- Gradient-orientation agreement (DEM hillshades): the mean cosine similarity between the image
  gradients (central differences on the channel-mean grey image, interior pixels) of the two images,
  over the pixels where both gradient magnitudes are at least ``min_magnitude`` grey levels per pixel.
  1 = same illumination pattern orientation everywhere, 0 = unrelated, -1 = inverted. Hillshades are
  min-max stretched per tile and carry no metres, so orientation is what survives (research notes §1.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from copgen.metrics.errors import MetricInputError, as_uint8_batch, check_same_shape

DATA_RANGE = 255.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scipy/scikit-image truncation that gives the 11-tap window of Wang et al.
SSIM_K1 = 0.01
SSIM_K2 = 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# Major TOM S2 thumbnail stretch: v = uint8(clip(GAIN * reflectance**GAMMA, 0, 1) * 255).
S2_GAIN = 1.3
S2_GAMMA = 0.6

# Samples per torch chunk: small enough that the 5 float64 maps per channel stay cache-friendly.
_CHUNK = 4

ImageBatch = np.ndarray | torch.Tensor


def _pair(pred: ImageBatch, target: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
    a = as_uint8_batch(pred, "pred")
    b = as_uint8_batch(target, "target")
    check_same_shape(a, b, ("pred", "target"))
    return a, b


def _chunks(n: int, size: int = _CHUNK) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _planes(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B*C, 1, H, W) float: each channel is an independent plane."""
    b, h, w, c = images.shape
    return images.permute(0, 3, 1, 2).reshape(b * c, 1, h, w).to(dtype)


def psnr(pred: ImageBatch, target: ImageBatch, max_db: float | None = None) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per sample (data range 255); ``inf`` for identical images.

    ``max_db`` caps the value (useful where identical pairs are expected, e.g. a fixed-seed attractor).
    """
    a, b = _pair(pred, target)
    out = np.empty(a.shape[0], dtype=np.float64)
    for s in _chunks(a.shape[0]):
        diff = a[s].to(torch.float64) - b[s].to(torch.float64)
        mse = diff.square().flatten(1).mean(1).numpy()
        with np.errstate(divide="ignore"):
            out[s] = 10.0 * np.log10(DATA_RANGE**2 / mse)
    if max_db is not None:
        out = np.minimum(out, max_db)
    return out


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    """The normalised 1-D Gaussian taps scipy.ndimage uses: radius int(truncate*sigma + 0.5)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _filter_valid(maps: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of (..., H, W) maps, keeping only the valid (unpadded) region.

    Written as in-place accumulation of shifted views: on CPU this is several times faster than a
    grouped ``conv2d`` with 1-D kernels, and exact in float64.
    """
    weights = taps.tolist()
    width = maps.shape[-1] - len(weights) + 1
    rows = maps[..., :width] * weights[0]
    for i, w in enumerate(weights[1:], start=1):
        rows.add_(maps[..., i : i + width], alpha=w)
    height = maps.shape[-2] - len(weights) + 1
    out = rows[..., :height, :] * weights[0]
    for i, w in enumerate(weights[1:], start=1):
        out.add_(rows[..., i : i + height, :], alpha=w)
    return out


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor, taps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term over the valid region, per plane: (N,), (N,)."""
    mu = _filter_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), taps)
    ux, uy, uxx, uyy, uxy = mu.unbind(1)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    cs_map = (2 * vxy + c2) / (vx + vy + c2)
    ssim_map = (2 * ux * uy + c1) / (ux * ux + uy * uy + c1) * cs_map
    return ssim_map.flatten(1).mean(1), cs_map.flatten(1).mean(1)


def _window_size() -> int:
    return gaussian_window().numel()


def ssim(pred: ImageBatch, target: ImageBatch, dtype: torch.dtype = torch.float64) -> np.ndarray:
    """SSIM per sample (convention in the module docstring; equals scikit-image's Gaussian setting)."""
    a, b = _pair(pred, target)
    win = _window_size()
    if min(a.shape[1], a.shape[2]) < win:
        raise MetricInputError("pred", f"SSIM needs images of at least {win} px, got {tuple(a.shape[1:3])}")
    taps = gaussian_window()
    channels = a.shape[-1]
    out = np.empty(a.shape[0], dtype=np.float64)
    for s in _chunks(a.shape[0]):
        value, _ = _ssim_and_cs(_planes(a[s], dtype), _planes(b[s], dtype), taps)
        out[s] = value.view(-1, channels).mean(1).double().numpy()
    return out


def ms_ssim_scales(height: int, width: int, max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """How many MS-SSIM scales fit: each scale must still hold one full window after 2x pooling."""
    win = _window_size()
    side = min(height, width)
    scales = 0
    while scales < max_scales and side >= win:
        scales += 1
        side //= 2
    return scales


def ms_ssim(
    pred: ImageBatch,
    target: ImageBatch,
    allow_fewer_scales: bool = True,
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    """Multi-scale SSIM per sample; NaN where the image is too small (see the module docstring)."""
    a, b = _pair(pred, target)
    n_scales = ms_ssim_scales(a.shape[1], a.shape[2])
    full = len(MS_SSIM_WEIGHTS)
    if n_scales == 0 or (n_scales < full and not allow_fewer_scales):
        return np.full(a.shape[0], np.nan)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:n_scales], dtype=torch.float64)
    weights = weights / weights.sum()
    taps = gaussian_window()
    channels = a.shape[-1]
    out = np.empty(a.shape[0], dtype=np.float64)
    for s in _chunks(a.shape[0]):
        x, y = _planes(a[s], dtype), _planes(b[s], dtype)
        terms = []
        for scale in range(n_scales):
            ssim_value, cs_value = _ssim_and_cs(x, y, taps)
            terms.append(ssim_value if scale == n_scales - 1 else cs_value)
            if scale < n_scales - 1:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        stacked = torch.stack(terms).double().clamp_min(0.0)  # (scales, planes)
        per_plane = torch.prod(stacked ** weights.view(-1, 1), dim=0)
        out[s] = per_plane.view(-1, channels).mean(1).numpy()
    return out


def s2_reflectance(images: ImageBatch) -> tuple[np.ndarray, np.ndarray]:
    """Invert the Major TOM S2 thumbnail stretch: uint8 (B, H, W, 3) -> reflectance (DN/10000), valid mask.

    ``reflectance = (v / 255 / 1.3) ** (1 / 0.6)``. The forward stretch truncates, so this returns the
    lower edge of each quantisation bin. Pixels with 0 (below the first bin) or 255 (clipped, reflectance
    at or above ~0.645) in any band are censored: the mask (B, H, W) is False there.
    """
    v = as_uint8_batch(images, "images").numpy()
    if v.shape[-1] != 3:
        raise MetricInputError("images", f"S2 thumbnails have 3 bands (B04, B03, B02), got {v.shape[-1]}")
    reflectance = (v.astype(np.float64) / 255.0 / S2_GAIN) ** (1.0 / S2_GAMMA)
    valid = np.all((v > 0) & (v < 255), axis=-1)
    return reflectance, valid


def _s2_pair(pred: ImageBatch, target: ImageBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = _pair(pred, target)
    ra, va = s2_reflectance(a)
    rb, vb = s2_reflectance(b)
    return ra, rb, va & vb


def spectral_angle(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Mean spectral angle (radians) per sample between float spectra (B, H, W, bands) over ``mask``.

    The angle is atan2(|a x b|, a.b) written via the Lagrange identity, which stays accurate near 0
    where arccos of a cosine loses half its digits.
    """
    dot = np.sum(pred * target, axis=-1)
    cross_sq = np.sum(pred * pred, axis=-1) * np.sum(target * target, axis=-1) - dot * dot
    angle = np.arctan2(np.sqrt(np.clip(cross_sq, 0.0, None)), dot)
    # Zero spectra have no direction: count them as invalid rather than as angle 0.
    defined = (np.linalg.norm(pred, axis=-1) > 0) & (np.linalg.norm(target, axis=-1) > 0)
    mask = defined if mask is None else (mask & defined)
    return _masked_mean(angle, mask)


def ergas(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """ERGAS (ratio h/l = 1) per sample between float images (B, H, W, bands) over ``mask``."""
    if mask is None:
        mask = np.ones(pred.shape[:-1], dtype=bool)
    weights = mask[..., None].astype(np.float64)
    count = weights.sum(axis=(1, 2))  # (B, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mse = ((pred - target) ** 2 * weights).sum(axis=(1, 2)) / count
        mean = (target * weights).sum(axis=(1, 2)) / count
        value = 100.0 * np.sqrt(np.mean(mse / mean**2, axis=-1))
    return np.where(count[:, 0] > 0, value, np.nan)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    count = mask.sum(axis=(1, 2))
    total = np.where(mask, values, 0.0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def sam(pred: ImageBatch, target: ImageBatch) -> np.ndarray:
    """Spectral angle mapper (radians) on inverted S2 reflectance, censored pixels masked; per sample."""
    ra, rb, valid = _s2_pair(pred, target)
    return spectral_angle(ra, rb, valid)


def s2_ergas(pred: ImageBatch, target: ImageBatch) -> np.ndarray:
    """ERGAS (ratio 1) on inverted S2 reflectance, censored pixels masked; per sample."""
    ra, rb, valid = _s2_pair(pred, target)
    return ergas(ra, rb, valid)


def gradient_orientation_agreement(
    pred: ImageBatch, target: ImageBatch, min_magnitude: float = 1.0
) -> np.ndarray:
    """Mean cosine similarity of the hillshade image gradients per sample (see the module docstring)."""
    a, b = _pair(pred, target)
    out = np.empty(a.shape[0], dtype=np.float64)
    for s in _chunks(a.shape[0]):
        ga = _central_gradients(a[s])
        gb = _central_gradients(b[s])
        dot = (ga * gb).sum(1)
        na, nb = ga.norm(dim=1), gb.norm(dim=1)
        valid = (na >= min_magnitude) & (nb >= min_magnitude)
        cosine = torch.where(valid, dot / (na * nb).clamp_min(1e-12), torch.zeros_like(dot))
        count = valid.flatten(1).sum(1)
        total = cosine.flatten(1).sum(1)
        value = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))
        out[s] = value.numpy()
    return out


def _central_gradients(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, 2, H-2, W-2) float64 (d/dx, d/dy) of the channel-mean grey image."""
    grey = images.to(torch.float64).mean(-1)
    gx = (grey[:, 1:-1, 2:] - grey[:, 1:-1, :-2]) / 2.0
    gy = (grey[:, 2:, 1:-1] - grey[:, :-2, 1:-1]) / 2.0
    return torch.stack([gx, gy], dim=1)


PairedMetric = Callable[[ImageBatch, ImageBatch], np.ndarray]
