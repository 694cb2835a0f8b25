"""Self-loop conditioning: the model regenerates from its own outputs, K times.

A loop spec names the modalities the chain walks through, ``S2L2A>S1RTC`` (alternate: S2L2A→S1RTC,
S1RTC→S2L2A, ...) or ``S2L2A>S1RTC>DEM>S2L2A`` (a cycle; a trailing repeat of the first modality only
closes it). Iteration 0 is the real state; iteration k (1..K) conditions on the latest version of the
step's source modality and generates its target. Between iterations the state travels as uint8
thumbnails, as in the official looping scripts (decode → 8-bit PNG → re-encode with a fresh posterior
sample), or as latents (``carry="latent"``) to separate quantisation/VAE drift from model drift.

Controls (each its own curve, so drift can be attributed; metrics-peers.md §2.3):
- ``control="ae-roundtrip"``: no diffusion; the target is only decoded→uint8→encoded again each time it
  comes round, with the same number of autoencoder passes per modality as the model loop;
- ``seed_policy``: ``fixed`` (the same seed at every iteration: a deterministic map, attractors show up
  as step-to-step change → 0) or ``fresh`` (a new seed per iteration: a Gibbs-like chain);
- ``inject_p``: with probability p per sample and iteration, the condition is the *real* source image
  instead of the generated one (real-data injection).

Pure torch/numpy: works on a :class:`copgen.generate.CopGen` and knows nothing of files.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from copgen import seeds as seeding
from copgen.loop_config import (  # noqa: F401 - re-exported: the loop's options live there (torch-free)
    Carry,
    Control,
    LoopConfig,
    LoopError,
    LoopSpec,
    SeedPolicy,
)
from copgen.modalities import Modality
from copgen.records import Origin


def iteration_seeds(
    run_seed: int, samples: Sequence[tuple[str, int | str]], k: int, policy: SeedPolicy
) -> list[int]:
    """Per-sample seeds of iteration ``k``: ``fixed`` reuses iteration 1's seed at every k."""
    it = 1 if policy is SeedPolicy.FIXED else k
    return [seeding.sample_seed(run_seed, cell, patch, it) for cell, patch in samples]


def injection_mask(run_seed: int, samples: Sequence[tuple[str, int | str]], k: int, p: float) -> np.ndarray:
    """Which samples condition on the real source at iteration ``k`` (seeded per sample, batch-free)."""
    if p <= 0:
        return np.zeros(len(samples), dtype=bool)
    u = [
        torch.rand((), generator=seeding.generator(seeding.sample_seed(run_seed, c, q, k, "inject"))).item()
        for c, q in samples
    ]
    return np.asarray(u) < p


@dataclass
class IterationResult:
    """What iteration ``k`` produced for a batch of samples."""

    k: int
    images: dict[Modality, np.ndarray]  # the modalities produced at k (all real ones at k=0)
    origin: dict[Modality, Origin]  # every modality: REAL at k=0, GENERATED or ABSENT after
    source: Modality | None = None
    target: Modality | None = None
    seeds: list[int] = field(default_factory=list)
    injected: np.ndarray | None = None
    latents: dict[Modality, torch.Tensor] = field(default_factory=dict)


def run_loop(
    copgen,
    real: Mapping[Modality, np.ndarray],
    samples: Sequence[tuple[str, int | str]],
    config: LoopConfig,
) -> Iterator[IterationResult]:
    """Run the loop for a batch; yields iteration 0 (the real state) then 1..K.

    ``real``: uint8 (B, S, S, 3) per modality, at least the spec's modalities; ``samples``: the
    (grid_cell, patch) of each row, from which every seed derives.
    """
    missing = [m.name for m in config.spec.modalities if m not in real]
    if missing:
        raise LoopError(f"loop {config.spec}: real images missing for {', '.join(missing)}")
    n = len(samples)
    for m, imgs in real.items():
        if len(imgs) != n:
            raise LoopError(f"{Modality.parse(m).name}: {len(imgs)} images for {n} samples")

    current: dict[Modality, np.ndarray] = {Modality.parse(m): v for m, v in real.items()}
    current_latent: dict[Modality, torch.Tensor] = {}
    yield IterationResult(
        k=0,
        images=dict(current),
        origin={m: (Origin.REAL if m in current else Origin.ABSENT) for m in Modality},
    )
    for k in range(1, config.iterations + 1):
        src, tgt = config.spec.step(k)
        seeds = iteration_seeds(config.run_seed, samples, k, config.seed_policy)
        if config.control is Control.AE_ROUNDTRIP:
            # Only the autoencoder: the target's latest state, encoded (fresh posterior sample) and decoded.
            latents = copgen.encode({tgt: current[tgt]}, seeds)
            out = copgen.decode(latents)
            injected = np.zeros(n, dtype=bool)
        else:
            injected = injection_mask(config.run_seed, samples, k, config.inject_p)
            condition = _condition(copgen, config, src, current, current_latent, real, injected, seeds)
            targets = [m for m in Modality if m != src] if config.joint else [tgt]
            out, latents = copgen.generate({src: condition}, targets, seeds, return_latents=True)
            latents = {m: z for m, z in latents.items() if m in out}
        current.update(out)
        current_latent.update(latents)
        yield IterationResult(
            k=k,
            images=out,
            origin={m: (Origin.GENERATED if m in out else Origin.ABSENT) for m in Modality},
            source=src,
            target=tgt,
            seeds=seeds,
            injected=injected,
            latents=latents,
        )


def _condition(copgen, config, src, current, current_latent, real, injected, seeds):
    """The source condition of one step: uint8 images, or latents when the loop carries latents."""
    if config.carry is Carry.IMAGE or src not in current_latent:
        images = current[src].copy()
        if injected.any():
            images[injected] = real[src][injected]
        return images
    lat = current_latent[src].clone()
    if injected.any():
        rows = torch.from_numpy(injected)
        lat[rows] = copgen.encode({src: real[src]}, seeds)[src][rows]
    return lat
