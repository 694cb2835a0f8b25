"""What a run is: the small, picklable descriptions that the driver plans and the workers execute.

Everything here travels with every task, so it holds URLs, options and ids, never data or models.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from copgen.errors import CopgenError
from copgen.flows.models import ModelSpec
from copgen.modalities import Modality
from copgen.storage.fsutil import check_id, join_url
from copgen.storage.majortom.reader import MajorTomReader

PATCH_MODES = ("center", "grid")


class JobError(CopgenError, ValueError):
    """An option combination that cannot run; the message names the option."""


def new_run_id(prefix: str) -> str:
    """``<prefix>-YYYYmmddTHHMMSS-<6 hex>``: sortable, unique, safe as a path component."""
    return f"{prefix}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def check_run_id(run_id: str) -> str:
    try:
        return check_id(run_id, "--run-id")
    except ValueError as exc:
        raise JobError(str(exc)) from None


@dataclass(frozen=True)
class SourceSpec:
    """A Major TOM Core source: a root holding ``Core-*`` datasets and/or per-modality URLs."""

    root: str | None = None
    urls: dict[str, str] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Expected thumbnail side per modality name; empty = the published sizes (1068, DEM 356), -1 = any.
    thumbnail_sizes: dict[str, int] = field(default_factory=dict)

    def open(self, on_error: str = "skip") -> MajorTomReader:
        from copgen.storage.majortom.tiles_folder import TileFolderReader, is_tiles_folder

        if not self.urls and is_tiles_folder(self.root, self.storage_options):
            return TileFolderReader(self.root, storage_options=self.storage_options, on_error=on_error)
        sizes = {m: (None if v < 0 else v) for m, v in self.thumbnail_sizes.items()}
        return MajorTomReader(self.root, urls=self.urls or None, storage_options=self.storage_options,
                              on_error=on_error, thumbnail_sizes=sizes or None)


@dataclass(frozen=True)
class OutputLayout:
    """Where a run writes: ``<out>/<name>.zarr`` cubes, ``<out>/tables/{metrics,provenance}``."""

    out: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def cube(self, name: str) -> str:
        return join_url(self.out, f"{name}.zarr")

    @property
    def metrics(self) -> str:
        return join_url(self.out, "tables", "metrics")

    @property
    def provenance(self) -> str:
        return join_url(self.out, "tables", "provenance")


@dataclass(frozen=True)
class RunInfo:
    """Run-level provenance shared by every block (DESIGN §7)."""

    run_id: str
    run_seed: int
    model: ModelSpec
    network_sha256: str
    autoencoder_sha256: str
    package_version: str
    synthetic: bool
    sample_size: int
    latent_shape: tuple[int, int, int]
    patch_mode: str  # center | grid
    invalid_rows: str = "quarantine"  # what rejected metadata rows mean: quarantine | missing

    def provenance(self) -> dict[str, Any]:
        return {
            "invalid_rows": self.invalid_rows,
            "run_id": self.run_id,
            "run_seed": self.run_seed,
            "network": _public_url(self.model.weights),
            "autoencoder": _public_url(self.model.vae),
            "network_sha256": self.network_sha256,
            "autoencoder_sha256": self.autoencoder_sha256,
            "sampler": self.model.solver,
            "steps": self.model.steps,
            "dtype": self.model.dtype,
            "batch_size": self.model.batch_size,
            "package_version": self.package_version,
            "synthetic_inputs": self.synthetic,
            "sample_size": self.sample_size,
            "patches": self.patch_mode,
        }


def patches_for(mode: str) -> list[str]:
    """The patch labels of a patch mode: the centre crop, or the 16 patches of the 4x4 grid."""
    if mode == "center":
        return ["center"]
    if mode == "grid":
        return [str(p) for p in range(16)]
    raise JobError(f"--patches {mode!r}: choose 'center' or 'grid'")


def patch_arg(label: str) -> str | int:
    return label if label == "center" else int(label)


def _public_url(url: str) -> str:
    from copgen.storage.fsutil import redact_url

    return redact_url(url)


def modality_names(mods) -> list[str]:
    return [Modality.parse(m).name for m in mods]
