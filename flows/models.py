"""Which model a run uses, how a checkpoint becomes a module, and its one load per worker process.

``load_checkpoint`` (``load_network``/``load_autoencoder``) joins the two halves of a checkpoint load:
the bytes (``copgen.storage.checkpoint_files``) and fitting them to a module (``copgen.checkpoints``).

Tasks receive a :class:`ModelSpec` (URLs and settings: a few hundred bytes), never model objects: a
pickled model would be re-sent with every task (pipeline-stack.md §2.5.7). Each worker process loads
the network and autoencoder once, on first use, and keeps them for every later block.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from copgen.autoencoder import AutoencoderKL
from copgen.checkpoints import AUTOENCODER, NETWORK, ModelKind, build_module
from copgen.errors import CopgenError
from copgen.flows.defaults import DEFAULT_SOLVER, DEFAULT_STEPS
from copgen.generate import COMPILE_MODES, CopGen, fit_batch_size
from copgen.model import Triffuser
from copgen.storage.checkpoint_files import read_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# ``--dtype auto`` on a CPU with native bf16 units picks bf16 only if the bundled model's measured
# quality in bf16 equals fp32 (benchmarks/solver_quality.py, table in benchmarks/RESULTS.md, "Session 5:
# bf16 on CPU": 2m-10 and release-50 in bf16 within the fp32 release-50 CI on every target).
CPU_BF16_QUALITY_EQUAL = True


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 matrix units (AMX-BF16 or AVX512-BF16): bf16 autocast pays off there."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # other systems: torch's own probe
    return bool(probe and probe())


def auto_dtype(device: torch.device) -> str:
    """``--dtype auto``: bf16 on CUDA; on CPU bf16 where it is native and measured equal, else fp32."""
    if device.type == "cuda":
        return "bfloat16"
    if device.type == "cpu" and CPU_BF16_QUALITY_EQUAL and native_bf16_cpu():
        return "bfloat16"
    return "float32"


def load_checkpoint(
    kind: ModelKind,
    url: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    sha256: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """``kind``'s module with the weights at ``url`` (any fsspec URL; ``sha256`` verified when given).

    Config: ``config`` (a ``TriffuserConfig``/``AutoencoderConfig`` or its dict), else ``<name>.json`` or
    ``config.json`` beside the weights (a JSON with a ``"config"`` entry, like the reference sidecars, or
    the bare config), else the safetensors header's ``config``, else the release config when the keys and
    shapes are the release's (``copgen.checkpoints.resolve_config``). Floating weights are cast to
    ``dtype`` (default float32). Returned in eval mode, with ``checkpoint_info``.
    """
    ckpt = read_checkpoint(url, sha256=sha256, storage_options=storage_options, sidecars=config is None)
    return build_module(kind, ckpt, config, device=device, dtype=dtype)


def load_network(url: str | os.PathLike, config: Mapping[str, Any] | None = None, **options) -> Triffuser:
    """The COP-GEN-Beta network with the weights at ``url``; ``config`` and ``options`` (``sha256``,
    ``storage_options``, ``device``, ``dtype``) as for :func:`load_checkpoint`."""
    return load_checkpoint(NETWORK, url, config, **options)  # type: ignore[return-value]


def load_autoencoder(url: str | os.PathLike, config: Mapping[str, Any] | None = None,
                     **options) -> AutoencoderKL:
    """The KL autoencoder with the weights at ``url`` (LDM or diffusers layout); ``config``: also the LDM
    form ``{ddconfig, embed_dim, scale_factor}``; the release SD KL-f8 config when the keys and shapes
    match it; ``options`` as for :func:`load_checkpoint`."""
    return load_checkpoint(AUTOENCODER, url, config, **options)  # type: ignore[return-value]


class ModelSpecError(CopgenError, ValueError):
    """A model option that cannot be honoured (unknown dtype, no GPU for device=cuda, ...)."""


@dataclass(frozen=True)
class ModelSpec:
    weights: str  # network checkpoint URL (local path, s3://, hf://, file://)
    vae: str  # autoencoder checkpoint URL
    weights_sha256: str | None = None
    vae_sha256: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 (autocast) | auto (resolved per worker: auto_dtype)
    steps: int = DEFAULT_STEPS  # flows/defaults.py: measured equal to the release's 50 steps
    solver: str = DEFAULT_SOLVER  # 2m (multistep) | release (singlestep order 3; 50 steps = the release)
    batch_size: int = 16  # samples per network batch; every batch is padded to it (batch-invariant bits)
    # 0: fitted to each worker's GPU memory (copgen.generate.fit_batch_size; bytes then depend on the GPU)
    compile: str | None = None  # torch.compile mode of the network (copgen.generate.COMPILE_MODES)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES and self.dtype != "auto":
            raise ModelSpecError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}, auto")
        if self.steps < 1 or self.batch_size < 0:
            raise ModelSpecError(f"steps={self.steps}, batch_size={self.batch_size}: steps must be >= 1, "
                                 "batch_size >= 1 (or 0: fitted to the GPU's memory)")
        if self.compile not in COMPILE_MODES:
            choices = ", ".join(map(str, COMPILE_MODES))
            raise ModelSpecError(f"compile={self.compile!r}: choose one of {choices}")

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
            dtype = auto_dtype(device) if spec.dtype == "auto" else spec.dtype
            batch = spec.batch_size or fit_batch_size(net, device, DTYPES[dtype])
            model = CopGen(net, ae, device=device, dtype=DTYPES[dtype], steps=spec.steps,
                           solver=spec.solver, batch_size=batch, compile=spec.compile)
            _CACHE.clear()  # one model per worker: a new spec replaces the old one (GPU memory)
            _CACHE[key] = model
        return model


def sample_size(copgen: CopGen) -> int:
    """Pixel size of the model's samples: latent size x the autoencoder's downsampling factor."""
    return int(copgen.latent_shape[-1] * copgen.autoencoder.downsample_factor)
