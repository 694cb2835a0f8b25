"""What a self-loop study runs: the loop spec, its options and controls (torch-free).

Parsing and checking only: the CLI validates ``copgen loop``'s options with this module before it imports
torch, Prefect or Dask (fail fast, ``copgen.flows.preflight``); ``copgen.loop`` runs the configs and
re-exports these names.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace

from copgen.errors import CopgenError
from copgen.modalities import Modality


class LoopError(CopgenError, ValueError):
    """A loop spec or configuration that cannot run."""


class SeedPolicy(enum.StrEnum):
    FIXED = "fixed"
    FRESH = "fresh"


class Control(enum.StrEnum):
    MODEL = "model"
    AE_ROUNDTRIP = "ae-roundtrip"


class Carry(enum.StrEnum):
    IMAGE = "image"
    LATENT = "latent"


@dataclass(frozen=True)
class LoopSpec:
    """The cycle of modalities a loop walks through."""

    cycle: tuple[Modality, ...]

    @classmethod
    def parse(cls, text: str) -> LoopSpec:
        parts = [p for p in re.split(r"\s*(?:->|>)\s*", (text or "").strip()) if p]
        if len(parts) < 2:
            raise LoopError(f"loop spec {text!r}: need at least two modalities, e.g. 'S2L2A>S1RTC'")
        try:
            mods = [Modality.parse(p) for p in parts]
        except ValueError as exc:
            raise LoopError(f"loop spec {text!r}: {exc}") from None
        if len(mods) > 2 and mods[-1] == mods[0]:
            mods = mods[:-1]  # 'A>B>C>A' closes the cycle 'A>B>C'
        for a, b in zip(mods, mods[1:] + mods[:1], strict=True):
            if a == b:
                raise LoopError(f"loop spec {text!r}: a step from {a.name} to itself generates nothing")
        if len(mods) == 2 and mods[0] == mods[1]:
            raise LoopError(f"loop spec {text!r}: needs two different modalities")
        return cls(tuple(mods))

    def step(self, k: int) -> tuple[Modality, Modality]:
        """(source, target) of iteration ``k`` (1-based)."""
        if k < 1:
            raise LoopError(f"iteration {k}: loop iterations start at 1 (0 is the real state)")
        i = (k - 1) % len(self.cycle)
        return self.cycle[i], self.cycle[(i + 1) % len(self.cycle)]

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return tuple(sorted(set(self.cycle)))

    def __str__(self) -> str:
        return ">".join(m.name for m in (*self.cycle, self.cycle[0]))


@dataclass(frozen=True)
class LoopConfig:
    spec: LoopSpec
    iterations: int
    seed_policy: SeedPolicy = SeedPolicy.FRESH
    control: Control = Control.MODEL
    inject_p: float = 0.0
    carry: Carry = Carry.IMAGE
    run_seed: int = 0
    joint: bool = False  # generate every non-conditioning modality at each step, as the official script

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise LoopError(f"iterations={self.iterations}: need K >= 1")
        if not 0.0 <= self.inject_p <= 1.0:
            raise LoopError(f"inject_p={self.inject_p}: a probability in [0, 1]")
        if self.control is Control.AE_ROUNDTRIP and (self.inject_p or self.joint):
            raise LoopError("the autoencoder round-trip control takes no injection and no joint generation")

    @property
    def label(self) -> str:
        """A short condition name for tables and plots."""
        parts = [str(self.spec), self.control.value, f"seed={self.seed_policy.value}"]
        if self.inject_p:
            parts.append(f"inject={self.inject_p:g}")
        if self.carry is Carry.LATENT:
            parts.append("carry=latent")
        if self.joint:
            parts.append("joint")
        return " ".join(parts)


def parse_controls(base: LoopConfig, controls: str | list[str] | None) -> list[LoopConfig]:
    """The main condition plus one per control: ``ae-roundtrip``, ``fixed-seed``, ``fresh-seed``,
    ``inject=P`` (real-data injection with probability P), ``latent`` (carry latents, not thumbnails)."""
    items = controls.split(",") if isinstance(controls, str) else list(controls or [])
    configs = [base]
    for raw in (c.strip().lower() for c in items if c.strip()):
        if raw in ("ae-roundtrip", "ae", "autoencoder"):
            cfg = replace(base, control=Control.AE_ROUNDTRIP, inject_p=0.0, joint=False)
        elif raw in ("fixed-seed", "fixed"):
            cfg = replace(base, seed_policy=SeedPolicy.FIXED)
        elif raw in ("fresh-seed", "fresh"):
            cfg = replace(base, seed_policy=SeedPolicy.FRESH)
        elif raw.startswith("inject="):
            try:
                cfg = replace(base, inject_p=float(raw.split("=", 1)[1]))
            except ValueError:
                raise LoopError(f"--controls {raw!r}: inject=P needs a number P in [0, 1]") from None
        elif raw in ("latent", "latent-carry"):
            cfg = replace(base, carry=Carry.LATENT)
        else:
            raise LoopError(f"--controls: unknown control {raw!r}; use ae-roundtrip, fixed-seed, fresh-seed, "
                            "inject=P or latent")
        if cfg not in configs:
            configs.append(cfg)
    return configs


def loop_configs(spec: str, iterations: int, seed_policy: str, controls: str | list[str] | None,
                 inject_p: float = 0.0, carry: str = "image", run_seed: int = 0,
                 joint: bool = False) -> list[LoopConfig]:
    """The main condition, one per control, then one per further spec: several specs
    (``S2L2A>S2L1C,S2L2A>S1RTC``) run the controls on the first, the others as main loops."""
    specs = [t.strip() for t in spec.split(",") if t.strip()] or [spec]
    try:
        base = LoopConfig(LoopSpec.parse(specs[0]), iterations, SeedPolicy(seed_policy), Control.MODEL,
                          inject_p, Carry(carry), run_seed, joint)
        more = [replace(base, spec=LoopSpec.parse(t)) for t in specs[1:]]
    except ValueError as exc:  # LoopError and enum errors name the option
        raise LoopError(f"loop options: {exc}") from None
    configs = parse_controls(base, controls)
    return configs + [c for c in more if c not in configs]
