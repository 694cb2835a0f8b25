"""Conditional generation: known modalities + targets + per-sample seeds -> latents / images.

Release semantics (DESIGN §4): at every network evaluation, generated modalities carry the current
solver state and ``t·1000``; conditioning modalities their fixed latent at t = 0; modalities neither
generated nor conditioned get FRESH N(0, 1) noise, also at t = 0. The solver state is the reference's
joint vector: the generated modalities in canonical order, each flattened (C, H, W), concatenated.

``sample_latents`` works on latents and takes every noise tensor from the caller (parity with the
reference). ``CopGen`` works on uint8 images and draws every random number from per-sample seeds
(``copgen.seeds`` streams), so a sample's output never depends on the batch it sits in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
from copgen import seeds as seeding
from copgen.diffusion import RELEASE_STEPS, NoiseSchedule, solve
from copgen.errors import CopgenError
from copgen.modalities import Modality, parse_list
from copgen.model import Triffuser

#: ``(evaluation_index, modality) -> (B, C, h, w)`` noise for an ignored modality.
IgnoredNoiseFn = Callable[[int, Modality], torch.Tensor]
#: Called after every network evaluation with ``(index, t (B,), state x, predicted eps)`` (traces).
EvaluationHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]

# seed streams of one sample (see copgen.seeds): independent draws that never share a generator
POSTERIOR_STREAM = "posterior/{}"
INITIAL_NOISE_STREAM = "initial/{}"
IGNORED_NOISE_STREAM = "ignored"


#: ``CopGen(compile=...)``: None (eager), or a ``torch.compile`` mode for the network's evaluation
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune")


def batch_for_memory(free_bytes: int, per_sample_bytes: int, fraction: float = 0.6, cap: int = 128) -> int:
    """The largest power-of-two batch whose activations fit ``fraction`` of the free device memory
    (``per_sample_bytes``: measured peak growth per sample), at most ``cap``, at least 1."""
    if per_sample_bytes <= 0:
        return cap
    fit = int(free_bytes * fraction // per_sample_bytes)
    batch = 1
    while batch * 2 <= min(fit, cap):
        batch *= 2
    return batch


def fit_batch_size(network: Triffuser, device: torch.device | str, dtype: torch.dtype | None = None,
                   fraction: float = 0.6, cap: int = 128) -> int:
    """Batch size for ``network`` on a CUDA ``device``: one probe evaluation at batches 1 and 2 measures
    the peak memory per sample, then :func:`batch_for_memory` of the free memory. ``cap`` elsewhere (CPU:
    no memory limit worth probing). The bytes of a sample depend on the batch size, so a run that must be
    reproducible across devices fixes the batch size instead."""
    device = torch.device(device)
    if device.type != "cuda":
        return cap
    peaks = []
    shape = (network.num_modalities, 0, network.in_chans, network.img_size, network.img_size)
    for b in (1, 2):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        x = torch.randn((shape[0], b, *shape[2:]), device=device)
        t = torch.zeros((shape[0], b), device=device)
        with torch.no_grad(), _autocast(device, dtype):
            network.forward_stacked(x, t)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
        del x, t
    free, _total = torch.cuda.mem_get_info(device)
    return batch_for_memory(free, max(peaks[1] - peaks[0], 1), fraction, cap)


class GenerationError(CopgenError, ValueError):
    """A generation request that cannot be run (bad modality sets, shapes, dtypes or seeds)."""


class Autoencoder(Protocol):
    """What ``CopGen`` needs from ``copgen.autoencoder.AutoencoderKL``."""

    embed_dim: int
    scale_factor: float

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor: ...

    def sample(self, moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z_scaled: torch.Tensor) -> torch.Tensor: ...


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU-drawn noise to the device; pinned + non_blocking on CUDA so the host never waits for the GPU."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _ignored_noise_source(
    ignored_noise: IgnoredNoiseFn | Sequence[torch.Generator] | None, shape: tuple[int, ...], device
) -> IgnoredNoiseFn:
    """Normalise the three ways to supply ignored-modality noise into one callable."""
    if callable(ignored_noise):
        return lambda k, m: ignored_noise(k, m).to(device=device, dtype=torch.float32)
    if ignored_noise is None:  # the release: global RNG, torch.randn(B, C, h, w) per modality per evaluation
        return lambda k, m: _to_device(torch.randn(shape), device)
    generators = list(ignored_noise)
    if len(generators) != shape[0]:
        raise GenerationError(f"ignored_noise has {len(generators)} generators for a batch of {shape[0]}")
    return lambda k, m: _to_device(
        torch.stack([torch.randn(shape[1:], generator=g) for g in generators]), device
    )


def sample_latents(
    network: Triffuser,
    conditions: Mapping[Modality, torch.Tensor],
    targets: Sequence[Modality | str | int],
    noise: Mapping[Modality, torch.Tensor],
    steps: int = RELEASE_STEPS,
    solver: str = "release",
    ignored_noise: IgnoredNoiseFn | Sequence[torch.Generator] | None = None,
    autocast_dtype: torch.dtype | None = None,
    schedule: NoiseSchedule | None = None,
    on_evaluation: EvaluationHook | None = None,
) -> dict[Modality, torch.Tensor]:
    """Generate ``targets`` given ``conditions`` (latent batches (B, C, h, w), scaled latent space).

    ``noise``: initial noise per target. ``ignored_noise``: for modalities neither generated nor
    conditioned — a callable ``(evaluation_index, modality) -> (B, C, h, w)``, one ``torch.Generator``
    per sample (each draws (C, h, w) per ignored modality per evaluation, canonical order: batch
    independent), or None for the release's global-RNG ``torch.randn(B, C, h, w)``. ``autocast_dtype``
    (e.g. ``torch.bfloat16``) runs the network under autocast; the solver arithmetic stays float32.
    Returns the final latent (float32, on the network's device) per target.
    """
    gen = parse_list(targets)
    cond = {Modality.parse(m): v for m, v in conditions.items()}
    B, shape = _check_request(network, cond, gen, noise)
    M = network.num_modalities
    device = _device_of(network)
    ignored = [m for m in Modality if m < M and m not in gen and m not in cond]
    draw_ignored = _ignored_noise_source(ignored_noise, (B, *shape), device)
    cond_dev = {m: v.to(device=device, dtype=torch.float32) for m, v in cond.items()}
    gen_rows = torch.tensor(list(gen), device=device)
    is_gen = torch.zeros(M, 1, dtype=torch.bool, device=device)
    is_gen[gen_rows] = True
    n_gen = len(gen)
    evaluation = 0

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal evaluation
        state = x.view(B, n_gen, *shape)
        slots = []
        for m in Modality:
            if m >= M:
                break
            if m in cond_dev:
                slots.append(cond_dev[m])
            elif m in ignored:
                slots.append(draw_ignored(evaluation, m))
            else:
                slots.append(state[:, gen.index(m)])
        timesteps = torch.where(is_gen, (t * 1000)[None, :], torch.zeros((), device=device))
        eps = network.forward_stacked(torch.stack(slots), timesteps)
        eps = eps.index_select(0, gen_rows).transpose(0, 1).reshape(B, -1).float()
        if on_evaluation is not None:
            on_evaluation(evaluation, t, x, eps)
        evaluation += 1
        return eps

    x = torch.cat([noise[m].reshape(B, -1) for m in gen], dim=1).to(device=device, dtype=torch.float32)
    with torch.no_grad(), _autocast(device, autocast_dtype):
        x = solve(model_fn, x, solver=solver, steps=steps, schedule=schedule)
    out = x.view(B, n_gen, *shape)
    return {m: out[:, j].contiguous() for j, m in enumerate(gen)}


def _check_request(network: Triffuser, cond: Mapping[Modality, torch.Tensor], gen: Sequence[Modality],
                   noise: Mapping[Modality, torch.Tensor]) -> tuple[int, tuple[int, int, int]]:
    """The batch size and latent shape (C, h, w) of a generation request, after checking that targets and
    conditions are distinct modalities of the network and every latent has that shape."""
    if not gen:
        raise GenerationError("no target modality to generate")
    if overlap := set(gen) & set(cond):
        raise GenerationError(f"modalities {sorted(m.name for m in overlap)} are both condition and target")
    if missing := [m.name for m in gen if m not in noise]:
        raise GenerationError(f"no initial noise for target(s) {missing}")
    M = network.num_modalities
    if any(m >= M for m in (*gen, *cond)):
        raise GenerationError(f"the network has {M} modalities; got {[m.name for m in (*gen, *cond)]}")
    shape = (network.in_chans, network.img_size, network.img_size)
    B = noise[gen[0]].shape[0]
    for role, items in (("noise", {m: noise[m] for m in gen}), ("condition", cond)):
        for m, v in items.items():
            if tuple(v.shape) != (B, *shape):
                raise GenerationError(
                    f"{role} latent of {m.name} has shape {tuple(v.shape)}, expected {(B, *shape)}"
                )
    return B, shape


# ---- images <-> tensors ----------------------------------------------------------------------------------


def images_to_tensor(images: np.ndarray, name: str = "images") -> torch.Tensor:
    """uint8 (B, S, S, 3) RGB (or (B, S, S) / (B, S, S, 1) grey, replicated like PIL ``convert('RGB')``)
    -> float32 (B, 3, S, S) in [-1, 1], exactly ``Normalize(0.5, 0.5)(ToTensor()(img))`` of the release."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise GenerationError(f"{name}: expected uint8 images, got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.shape[1] != arr.shape[2]:
        raise GenerationError(f"{name}: expected shape (B, S, S, 3), got {tuple(np.shape(images))}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div(255)
    x = x.sub(0.5).div(0.5)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """Decoder output (B, 3, S, S) in ~[-1, 1] -> uint8 (B, S, S, 3), as the release writes PNGs:
    ``clamp(0.5·(x+1), 0, 1)``, then torchvision ``save_image``'s ``floor(255·y + 0.5)`` (round half up)."""
    y = (0.5 * (x.float() + 1.0)).clamp(0.0, 1.0)
    return y.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---- the image-level API ---------------------------------------------------------------------------------


class CopGen:
    """COP-GEN-Beta generation from images with per-sample seeds (batch-independent results).

    Every random draw derives from the sample's seed: posterior noise of each condition
    (stream ``posterior/<MODALITY>``), initial noise of each target (``initial/<MODALITY>``) and the
    per-evaluation noise of ignored modalities (one generator per sample, stream ``ignored``). All noise
    is drawn on the CPU, so a seed gives the same noise on every device. ``dtype`` other than float32
    runs the networks under autocast with that dtype.

    ``batch_size``: the network and autoencoder run on batches of exactly this many samples, the last
    one padded by repeating its final row (the padding is dropped). Kernels pick their blocking by batch
    size, so the same sample in batches of different sizes can differ in the last float bits, enough to
    flip a uint8 count; with a fixed batch size a sample's bytes do not depend on how work was split.
    """

    def __init__(
        self,
        network: Triffuser,
        autoencoder: Autoencoder | None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        steps: int = RELEASE_STEPS,
        solver: str = "release",
        batch_size: int | None = None,
        compile: str | None = None,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise GenerationError(f"batch_size={batch_size}: must be >= 1 (or None: one batch per call)")
        if compile not in COMPILE_MODES:
            raise GenerationError(f"compile={compile!r}: choose one of {', '.join(map(str, COMPILE_MODES))}")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.steps = steps
        self.solver = solver
        self.network = network.to(self.device).eval()
        self.autoencoder = autoencoder.to(self.device).eval() if autoencoder is not None else None
        self.schedule = NoiseSchedule()
        self.latent_shape = (network.in_chans, network.img_size, network.img_size)
        if compile is not None:
            # sample_latents calls forward_stacked: compile that entry point (an instance attribute, so the
            # module and its state_dict stay as they are). Batches are padded to one size, so shapes are
            # static: "reduce-overhead" captures each evaluation in a CUDA graph.
            mode = None if compile == "default" else compile
            self.network.forward_stacked = torch.compile(  # type: ignore[method-assign]
                self.network.forward_stacked, mode=mode, dynamic=False)

    def _require_autoencoder(self) -> Autoencoder:
        if self.autoencoder is None:
            raise GenerationError(
                "this CopGen has no autoencoder: pass conditions as latents, decode elsewhere"
            )
        return self.autoencoder

    @staticmethod
    def _check_seeds(seeds: Sequence[int], batch: int, what: str) -> list[int]:
        seeds = [int(s) for s in seeds]
        if len(seeds) != batch:
            raise GenerationError(f"{what}: {batch} samples but {len(seeds)} seeds")
        return seeds

    def encode(
        self, images: Mapping[Modality, np.ndarray], seeds: Sequence[int]
    ) -> dict[Modality, torch.Tensor]:
        """uint8 images per modality -> scaled posterior SAMPLES (B, C, h, w) float32 on CPU."""
        seeds = [int(s) for s in seeds]
        for key, imgs in images.items():
            self._check_seeds(seeds, len(imgs), f"{Modality.parse(key).name} images")
        return self._chunked(self._encode, dict(images), seeds)

    def _encode(self, images: Mapping[Modality, np.ndarray], seeds: Sequence[int]) -> dict:
        ae = self._require_autoencoder()
        out = {}
        for key, imgs in images.items():
            m = Modality.parse(key)
            x = images_to_tensor(imgs, name=f"{m.name} images")
            seeds = self._check_seeds(seeds, x.shape[0], f"{m.name} images")
            with torch.no_grad(), _autocast(self.device, self.dtype):
                moments = ae.encode_moments(_to_device(x, self.device)).float()
            latent_chw = (moments.shape[1] // 2, *moments.shape[2:])  # moments = mean ‖ logvar
            noise = seeding.randn(seeds, latent_chw, stream=POSTERIOR_STREAM.format(m.name))
            with torch.no_grad():
                z = ae.sample(moments, _to_device(noise, self.device)).float()
            if tuple(z.shape[1:]) != self.latent_shape:
                raise GenerationError(
                    f"{m.name} images of size {x.shape[-1]} encode to latents {tuple(z.shape[1:])}, but the "
                    f"network expects {self.latent_shape}"
                )
            out[m] = z.cpu()
        return out

    def decode(self, latents: Mapping[Modality, torch.Tensor]) -> dict[Modality, np.ndarray]:
        """Scaled latents per modality -> uint8 RGB images (B, S, S, 3)."""
        n = {len(z) for z in latents.values()}
        if len(n) > 1:
            raise GenerationError(f"decode: latent batches of different sizes {sorted(n)}")
        rows = [0] * (n.pop() if n else 0)  # decoding draws no noise: placeholder seeds for the chunker
        return self._chunked(lambda chunk, _seeds: self._decode(chunk), dict(latents), rows)

    def _decode(self, latents: Mapping[Modality, torch.Tensor]) -> dict[Modality, np.ndarray]:
        ae = self._require_autoencoder()
        out = {}
        for key, z in latents.items():
            with torch.no_grad(), _autocast(self.device, self.dtype):
                x = ae.decode(_to_device(z.to(torch.float32), self.device))
            out[Modality.parse(key)] = tensor_to_images(x)
        return out

    def _chunked(self, fn, batched: Mapping, seeds: list[int], **kwargs) -> dict:
        """Run ``fn(batched_chunk, seeds_chunk)`` on fixed-size padded chunks and concatenate results."""
        n = len(seeds)
        size = self.batch_size or n
        if n == 0 or (n <= size and (self.batch_size is None or n == size)):
            return fn(batched, seeds, **kwargs)
        parts: list[dict] = []
        for a in range(0, n, size):
            b = min(a + size, n)
            pad = size - (b - a)
            idx = list(range(a, b)) + [b - 1] * pad
            chunk = {k: _take(v, idx) for k, v in batched.items()}
            out = fn(chunk, [seeds[i] for i in idx], **kwargs)
            parts.append({k: v[: b - a] for k, v in out.items()})
        return {k: _concat([p[k] for p in parts]) for k in parts[0]}

    def generate_latents(
        self,
        conditions: Mapping[Modality, torch.Tensor],
        targets: Sequence[Modality | str | int],
        seeds: Sequence[int],
    ) -> dict[Modality, torch.Tensor]:
        """Latent-level generation with per-sample seeds; conditions are scaled latents (B, C, h, w)."""
        seeds = [int(s) for s in seeds]
        for m, z in conditions.items():
            self._check_seeds(seeds, z.shape[0], f"{Modality.parse(m).name} condition")
        return self._chunked(self._generate_latents, dict(conditions), seeds, targets=targets)

    def _generate_latents(self, conditions, seeds, targets) -> dict[Modality, torch.Tensor]:
        gen = parse_list(targets)
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise GenerationError("generate: no seeds (one seed per sample is required)")
        for m, z in conditions.items():
            self._check_seeds(seeds, z.shape[0], f"{Modality.parse(m).name} condition")
        noise = {
            m: seeding.randn(seeds, self.latent_shape, stream=INITIAL_NOISE_STREAM.format(m.name))
            for m in gen
        }
        generators = [seeding.generator(seeding.derive(s, IGNORED_NOISE_STREAM)) for s in seeds]
        latents = sample_latents(
            self.network,
            conditions,
            gen,
            noise,
            steps=self.steps,
            solver=self.solver,
            ignored_noise=generators,
            autocast_dtype=self.dtype,
            schedule=self.schedule,
        )
        return {m: z.cpu() for m, z in latents.items()}

    def generate(
        self,
        conditions: Mapping[Modality, np.ndarray | torch.Tensor],
        targets: Sequence[Modality | str | int],
        seeds: Sequence[int],
        return_latents: bool = False,
    ):
        """Generate ``targets`` from ``conditions`` (uint8 images (B, S, S, 3), or scaled latents
        (B, C, h, w) float tensors, per modality; may be empty = unconditional) with one seed per sample.

        Returns ``{target: uint8 (B, S, S, 3)}``, or ``(images, latents)`` with ``return_latents``
        (latents float32 on CPU; conditions' latents included under their modality)."""
        seeds = [int(s) for s in seeds]
        images, given = {}, {}
        for key, value in conditions.items():
            m = Modality.parse(key)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                given[m] = value.float()
            elif isinstance(value, np.ndarray):
                images[m] = value
            else:
                raise GenerationError(
                    f"condition {m.name}: expected uint8 numpy images or a float latent tensor, got "
                    f"{type(value).__name__}{'' if not hasattr(value, 'dtype') else f' of {value.dtype}'}"
                )
        cond_latents = {**given, **(self.encode(images, seeds) if images else {})}
        generated = self.generate_latents(cond_latents, targets, seeds)
        out_images = self.decode(generated)
        if return_latents:
            return out_images, {**cond_latents, **generated}
        return out_images


def _take(value, idx: list[int]):
    if isinstance(value, torch.Tensor):
        return value[torch.as_tensor(idx, dtype=torch.long)]
    return np.asarray(value)[idx]


def _concat(values: list):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    return np.concatenate(values)
