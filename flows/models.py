"""Which model a run uses, and its one load per worker process.

Tasks receive a :class:`ModelSpec` (URLs and settings: a few hundred bytes), never model objects: a
pickled model would be re-sent with every task (pipeline-stack.md §2.5.7). Each worker process loads
the network and autoencoder once, on first use, and keeps them for every later block.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from copgen.checkpoints import load_autoencoder, load_network
from copgen.errors import CopgenError
from copgen.generate import CopGen

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSpecError(CopgenError, ValueError):
    """A model option that cannot be honoured (unknown dtype, no GPU for device=cuda, ...)."""


@dataclass(frozen=True)
class ModelSpec:
    weights: str  # network checkpoint URL (local path, s3://, hf://, file://)
    vae: str  # autoencoder checkpoint URL
    weights_sha256: str | None = None
    vae_sha256: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 (autocast; bf16 on GPUs)
    steps: int = 50
    solver: str = "release"  # release (50-NFE singlestep order 3) | 2m (multistep, fewer steps)
    batch_size: int = 16  # samples per network batch; every batch is padded to it (batch-invariant bits)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ModelSpecError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ModelSpecError(f"steps={self.steps}, batch_size={self.batch_size}: both must be >= 1")

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelSpecError(f"--device {self.device}: no CUDA device is visible to this worker")
        return dev


_CACHE: dict[str, CopGen] = {}
_LOCK = threading.Lock()


def get_copgen(spec: ModelSpec) -> CopGen:
    """The process-wide model for ``spec`` (loaded on first use, then reused)."""
    key = spec.key()
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            device = spec.resolved_device()
            so = spec.storage_options or None
            net = load_network(spec.weights, sha256=spec.weights_sha256, storage_options=so, device=device)
            ae = load_autoencoder(spec.vae, sha256=spec.vae_sha256, storage_options=so, device=device)
            model = CopGen(net, ae, device=device, dtype=DTYPES[spec.dtype], steps=spec.steps,
                           solver=spec.solver, batch_size=spec.batch_size)
            _CACHE.clear()  # one model per worker: a new spec replaces the old one (GPU memory)
            _CACHE[key] = model
        return model


def sample_size(copgen: CopGen) -> int:
    """Pixel size of the model's samples: latent size x the autoencoder's downsampling factor."""
    return int(copgen.latent_shape[-1] * copgen.autoencoder.downsample_factor)
