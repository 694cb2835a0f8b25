"""Per-sample seeds: a sample's randomness derives from what it is, never from where it sits in a batch.

DESIGN §8: the seed derives from (run seed, grid cell, patch, iteration), so results do not depend on
sharding, block size or worker count. ``stream`` separates independent draws of one sample (initial
noise of each target, the autoencoder posterior noise, the per-evaluation noise of ignored modalities).
"""

from __future__ import annotations

import hashlib

import torch


def sample_seed(run_seed: int, grid_cell: str, patch: int | str, iteration: int = 0, stream: str = "") -> int:
    """A 63-bit seed from the sample's identity (stable across Python versions and platforms)."""
    key = f"{int(run_seed)}|{grid_cell}|{patch}|{int(iteration)}|{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def derive(seed: int, stream: str) -> int:
    """A sub-seed of ``seed`` for one named stream."""
    key = f"{int(seed)}|{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded with ``seed``. Noise is drawn on the CPU and moved, so that a sample's
    noise is the same on every device (CUDA generators produce other streams)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def randn(seeds: list[int], shape: tuple[int, ...], stream: str = "", device="cpu", dtype=torch.float32):
    """Stack of per-sample N(0,1) draws: row i depends on ``seeds[i]`` (and ``stream``) only."""
    rows = [torch.randn(shape, generator=generator(derive(s, stream) if stream else s)) for s in seeds]
    out = torch.stack(rows) if rows else torch.empty((0, *shape))
    return out.to(device=device, dtype=dtype)
