"""The data model every layer shares: what a sample is, where its inputs live, what a block will do.

One walk from the source to the cube uses these types and nothing else for a sample's plan:

    reader.pair()  -> Pairing.cells(): CellRecord per grid cell (its real thumbnails as SourceRef)
    plan           -> SamplePlan per cube sample (SampleKey, sources, targets), stored beside the cube
    worker         -> BlockPlan (a WorkBlock and its SamplePlans) -> reads the SourceRefs, generates
    cube write     -> BlockData with the block's SampleKeys, checked against the cube's coordinates

Plain frozen data (strings, ints, enums): no files are opened here, so the core may define them and
storage and flows share them (DESIGN "Data model"). ``Origin`` codes are what the cube stores.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from copgen.errors import CopgenError
from copgen.modalities import ALL, Modality

_BLOCK_ID = re.compile(r"^(\d{10})-(\d{10})$")


class RecordError(CopgenError, ValueError):
    """A record that cannot exist (bad block id, a plan whose length is not its block's)."""


class Origin(enum.IntEnum):
    """Per (sample, iteration, modality): where the pixels came from. The cube stores these codes."""

    ABSENT = 0
    REAL = 1
    GENERATED = 2

    @property
    def label(self) -> str:
        """The name used in tables and attrs: ``absent``, ``real``, ``generated``."""
        return self.name.lower()


# label -> code, in code order (the cube's ``origin_codes`` attr and the flag attributes of ``origin``)
ORIGIN_CODES: dict[str, int] = {o.label: int(o) for o in Origin}


@dataclass(frozen=True, order=True)
class SampleKey:
    """Identity of one cube sample: a grid cell, a patch label (``"center"`` or ``"0"``..``"15"``) and a
    seed variant. The cube's ``grid_cell``/``patch``/``variant`` coordinates hold exactly these."""

    grid_cell: str
    patch: str
    variant: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid_cell", str(self.grid_cell))
        object.__setattr__(self, "patch", str(self.patch))
        object.__setattr__(self, "variant", int(self.variant))


@dataclass(frozen=True)
class SourceRef:
    """Where one real thumbnail lives: a Major TOM image parquet file and its row group, plus the
    product it came from (provenance and georeferencing; ``None`` when the caller does not know it)."""

    modality: Modality
    grid_cell: str
    file: str
    row_group: int
    product_id: str | None = None
    timestamp: datetime | None = field(default=None, compare=False)
    crs: str | None = None
    cloud_cover: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TileRef:
    """A source tile that is not a whole Major TOM footprint (a GeoTIFF tile folder): its own CRS, GDAL
    transform (JSON list) and side in pixels georeference the samples cut from it."""

    epsg: int
    transform: str
    px: int


class _Sourced:
    """The real inputs of a record (``sources``), looked up by modality."""

    sources: tuple[SourceRef, ...]

    def source(self, modality: Modality) -> SourceRef | None:
        return next((s for s in self.sources if s.modality is modality), None)

    @property
    def present(self) -> frozenset[Modality]:
        return frozenset(s.modality for s in self.sources)


@dataclass(frozen=True)
class CellRecord(_Sourced):
    """One paired grid cell: its centre and the real thumbnails the source has for it."""

    grid_cell: str
    centre_lat: float
    centre_lon: float
    sources: tuple[SourceRef, ...] = ()
    tile: TileRef | None = None


@dataclass(frozen=True)
class SamplePlan(_Sourced):
    """What one cube sample needs: its key, its cell's centre, the real inputs, and the modalities to
    generate (completion; empty for a loop study, whose spec says what to generate)."""

    key: SampleKey
    centre_lat: float
    centre_lon: float
    sources: tuple[SourceRef, ...] = ()
    targets: tuple[Modality, ...] = ()
    tile: TileRef | None = None

    @property
    def grid_cell(self) -> str:
        return self.key.grid_cell


def expand_cells(cells: Sequence[CellRecord], patches: Sequence[str], samples_per_cell: int,
                 targets: Sequence[Iterable[Modality]]) -> list[SamplePlan]:
    """Cells -> samples (cell x patch x variant, in cell order); ``targets[i]`` for every sample of cell i."""
    out = []
    for cell, want in zip(cells, targets, strict=True):
        tgt = tuple(m for m in ALL if m in set(want))
        for p in patches:
            for v in range(samples_per_cell):
                out.append(SamplePlan(SampleKey(cell.grid_cell, str(p), v), cell.centre_lat, cell.centre_lon,
                                      cell.sources, tgt, cell.tile))
    return out


@dataclass(frozen=True, order=True)
class WorkBlock:
    """A contiguous range ``[start, stop)`` of cube samples: the unit one task computes and writes."""

    start: int
    stop: int

    @property
    def id(self) -> str:
        return f"{self.start:010d}-{self.stop:010d}"

    @property
    def size(self) -> int:
        return self.stop - self.start

    @classmethod
    def parse(cls, block_id: str) -> WorkBlock:
        """Inverse of ``id``; rejects anything else (block ids become object names)."""
        m = _BLOCK_ID.match(block_id) if isinstance(block_id, str) else None
        if not m or int(m.group(1)) >= int(m.group(2)):
            raise RecordError(
                f"invalid block id {block_id!r}: expected '<start:010d>-<stop:010d>' with start < stop")
        return cls(int(m.group(1)), int(m.group(2)))


@dataclass(frozen=True)
class BlockPlan:
    """One work block and the plans of its samples, in cube order (what a worker task receives)."""

    block: WorkBlock
    samples: tuple[SamplePlan, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", tuple(self.samples))
        if len(self.samples) != self.block.size:
            raise RecordError(f"block {self.block.id}: {len(self.samples)} sample plans for "
                              f"{self.block.size} samples")

    @property
    def keys(self) -> tuple[SampleKey, ...]:
        return tuple(s.key for s in self.samples)

    def index(self, i: int) -> int:
        """Cube sample index of the block's ``i``-th sample."""
        return self.block.start + i
