"""The plan beside a cube: the :class:`SamplePlan` of every sample, one Parquet object per grow.

Each grow of a cube stores the plans of its new samples as ``<cube>/_plan/<start>-<stop>.parquet``
(written before the grow: a batch without its plan could not be resumed), one Parquet row group per
``ROW_GROUP_BLOCKS`` work blocks. A block task reads only the row group holding its block
(:func:`read_block_plan`, via a :class:`PlanRef` in its arguments), so neither the driver nor a worker
ever holds the plan of a whole Major TOM-size run,
and a resumed run never depends on the source being re-paired the same way.
This module is the only place that knows the on-disk columns (format of the first release, kept so that
cubes written by it still resume)::

    grid_cell, patch, variant, centre_lat, centre_lon,
    per modality M: M_present, M_file, M_row, M_product_id, M_timestamp, M_crs, M_cloud_cover,
    targets (comma-separated modality names)
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from copgen.errors import CopgenError
from copgen.modalities import ALL, Modality
from copgen.records import BlockPlan, SampleKey, SamplePlan, SourceRef, TileRef, WorkBlock
from copgen.storage.cubes import Cube
from copgen.storage.fsutil import join_url, redact_url

PLAN_DIR = "_plan"
# Work blocks per Parquet row group of a plan object: what a worker reads for its block. One block per
# group made the write 4x slower and the object 3x larger (a footer entry per column and group: 1.9 MB
# for 512 blocks); 8 keep a worker's read at a few hundred rows (benchmarks/RESULTS.md, Session 5).
ROW_GROUP_BLOCKS = 8
log = logging.getLogger(__name__)


class PlanError(CopgenError):
    """A cube's plan is missing or does not fit the cube; the message names the cube and the object."""


def plan_url(cube_url: str, start: int, stop: int) -> str:
    return join_url(cube_url, PLAN_DIR, f"{start:010d}-{stop:010d}.parquet")


def to_frame(samples: Sequence[SamplePlan]) -> pd.DataFrame:
    """Plans -> the on-disk table (one row per sample)."""
    cols: dict[str, Any] = {
        "grid_cell": [s.key.grid_cell for s in samples],
        "patch": [s.key.patch for s in samples],
        "variant": np.array([s.key.variant for s in samples], dtype=np.int32),
        "centre_lat": np.array([s.centre_lat for s in samples], dtype=np.float64),
        "centre_lon": np.array([s.centre_lon for s in samples], dtype=np.float64),
    }
    if any(s.tile is not None for s in samples):  # GeoTIFF tiles: each georeferenced by its own file
        cols["tile_epsg"] = [None if s.tile is None else s.tile.epsg for s in samples]
        cols["tile_transform"] = [None if s.tile is None else s.tile.transform for s in samples]
        cols["tile_px"] = [None if s.tile is None else s.tile.px for s in samples]
    for m in ALL:
        refs = [s.source(m) for s in samples]
        cols[f"{m.name}_present"] = np.array([r is not None for r in refs], dtype=bool)
        cols[f"{m.name}_file"] = [None if r is None else r.file for r in refs]
        cols[f"{m.name}_row"] = pd.array([None if r is None else r.row_group for r in refs], dtype="Int64")
        cols[f"{m.name}_product_id"] = [None if r is None else r.product_id for r in refs]
        cols[f"{m.name}_timestamp"] = pd.to_datetime(
            [None if r is None else r.timestamp for r in refs], utc=True).as_unit("ms")
        cols[f"{m.name}_crs"] = [None if r is None else r.crs for r in refs]
        cols[f"{m.name}_cloud_cover"] = np.array(
            [np.nan if r is None or r.cloud_cover is None else r.cloud_cover for r in refs], dtype=np.float64)
    cols["targets"] = [",".join(m.name for m in s.targets) for s in samples]
    return pd.DataFrame(cols)


def from_frame(df: pd.DataFrame) -> list[SamplePlan]:
    """The on-disk table -> plans (columns a modality lacks mean: never present)."""
    n = len(df)

    def column(name: str) -> list:
        return df[name].tolist() if name in df else [None] * n

    cells, patches, variants = column("grid_cell"), column("patch"), column("variant")
    lat, lon, targets = column("centre_lat"), column("centre_lon"), column("targets")
    tiles = [TileRef(int(e), str(t), int(px)) if px is not None and pd.notna(px) else None
             for e, t, px in zip(column("tile_epsg"), column("tile_transform"), column("tile_px"),
                                 strict=True)]
    fields = ("present", "file", "row", "product_id", "timestamp", "crs", "cloud_cover")
    per = {m: [column(f"{m.name}_{f}") for f in fields] for m in ALL}
    out = []
    for i in range(n):
        cell = str(cells[i])
        sources = tuple(
            SourceRef(m, cell, str(file[i]), int(row[i]), _text(pid[i]), _time(ts[i]), _text(crs[i]),
                      None if cloud[i] is None or pd.isna(cloud[i]) else float(cloud[i]))
            for m, (present, file, row, pid, ts, crs, cloud) in per.items()
            if present[i] is not None and bool(present[i]))
        tgt = tuple(Modality.parse(t) for t in str(targets[i] or "").split(",") if t)
        out.append(SamplePlan(SampleKey(cell, str(patches[i]), int(variants[i] or 0)),
                              float(lat[i]), float(lon[i]), sources, tgt, tiles[i]))
    return out


def write_plan(cube: Cube, start: int, stop: int, samples: Sequence[SamplePlan],
               storage_options: Mapping[str, Any] | None) -> pd.DataFrame:
    """Store the plans of the cube's samples ``[start, stop)``; returns their table (:func:`to_frame`)."""
    if len(samples) != stop - start:
        raise PlanError(f"cube {redact_url(cube.url)}: {len(samples)} plans for samples [{start}, {stop})")
    buf = io.BytesIO()
    # row groups of whole blocks (batches start on a block boundary): a block task reads only its group
    frame = to_frame(samples)
    frame.to_parquet(buf, index=False, row_group_size=cube.spec.block_samples * ROW_GROUP_BLOCKS)
    with fsspec.open(plan_url(cube.url, start, stop), "wb", **dict(storage_options or {})) as f:
        f.write(buf.getvalue())
    return frame


def _read_batch(cube: Cube, start: int, stop: int, storage_options) -> pd.DataFrame | None:
    """The stored table of one batch, or ``None`` when it has none."""
    try:
        with fsspec.open(plan_url(cube.url, start, stop), "rb", **dict(storage_options or {})) as f:
            return pd.read_parquet(io.BytesIO(f.read()))
    except FileNotFoundError:
        return None


def read_plan(cube: Cube, storage_options: Mapping[str, Any] | None) -> list[SamplePlan]:
    """The plans of every batch of the cube, in cube sample order."""
    out: list[SamplePlan] = []
    for start, stop in cube.batches:
        frame = _read_batch(cube, start, stop, storage_options)
        if frame is None:
            raise _missing(cube, start, stop)
        out += from_frame(frame)
    return out


def plan_table(cube: Cube, storage_options: Mapping[str, Any] | None) -> pd.DataFrame:
    """The stored plan as one table indexed by cube sample, for readers that want columns (exports);
    a batch without a plan is skipped with a warning (its product ids are then unknown)."""
    parts = []
    for start, stop in cube.batches:
        frame = _read_batch(cube, start, stop, storage_options)
        if frame is None:
            log.warning("cube %s: no plan for samples [%d, %d): product ids unknown", redact_url(cube.url),
                        start, stop)
        else:
            parts.append(frame.set_axis(range(start, stop)))
    return pd.concat(parts) if parts else pd.DataFrame()


def _batch_of(cube: Cube, block: WorkBlock) -> tuple[int, int]:
    for start, stop in cube.batches:
        if start <= block.start and block.stop <= stop:
            return start, stop
    raise PlanError(f"cube {redact_url(cube.url)}: block {block.id} is in no batch of the cube")


def _missing(cube: Cube, start: int, stop: int) -> PlanError:
    return PlanError(f"cube {redact_url(cube.url)}: the plan of samples [{start}, {stop}) is missing "
                     f"({redact_url(plan_url(cube.url, start, stop))}); it cannot be resumed: write to a new "
                     "--out")


def read_block_plan(cube: Cube, block: WorkBlock, storage_options: Mapping[str, Any] | None) -> BlockPlan:
    """The :class:`BlockPlan` of one block, reading only the row groups that hold its samples (a worker's
    memory does not grow with the run; plans written before row groups per block read whole)."""
    start, stop = _batch_of(cube, block)
    lo, hi = block.start - start, block.stop - start
    try:
        with fsspec.open(plan_url(cube.url, start, stop), "rb", **dict(storage_options or {})) as f:
            pf = pq.ParquetFile(f)
            groups, first, offset = [], 0, 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset < hi and offset + n > lo:
                    first = offset if not groups else first
                    groups.append(g)
                offset += n
            table = pf.read_row_groups(groups)
    except FileNotFoundError:
        raise _missing(cube, start, stop) from None
    frame = table.slice(lo - first, hi - lo).to_pandas()
    return BlockPlan(block, tuple(from_frame(frame)))


@dataclass(frozen=True)
class PlanRef:
    """A block's plan by reference (a task argument of a few hundred bytes instead of its rows): the
    worker that runs the block reads them (:meth:`load`)."""

    cube_url: str
    block: WorkBlock
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def load(self) -> BlockPlan:
        cube = Cube.open(self.cube_url, self.storage_options, read_only=True)
        return read_block_plan(cube, self.block, self.storage_options)


def plan_refs(cube: Cube, blocks: Sequence[WorkBlock],
              storage_options: Mapping[str, Any] | None) -> list[PlanRef]:
    """A :class:`PlanRef` per block; the plan objects of their batches must exist (checked here, in the
    driver, so that a cube without its plan fails before any task starts)."""
    so = dict(storage_options or {})
    batches = sorted({_batch_of(cube, b) for b in blocks})
    if batches:
        fs, _ = fsspec.core.url_to_fs(plan_url(cube.url, *batches[0]), **so)
        for start, stop in batches:
            if not fs.exists(fs._strip_protocol(plan_url(cube.url, start, stop))):
                raise _missing(cube, start, stop)
    return [PlanRef(cube.url, b, so) for b in blocks]


def block_plans(cube: Cube, blocks: Sequence[WorkBlock],
                storage_options: Mapping[str, Any] | None) -> list[BlockPlan]:
    """The :class:`BlockPlan` of each of ``blocks`` (read from the stored plan)."""
    if not blocks:
        return []
    plans = read_plan(cube, storage_options)
    # cube sample index of each plan: batches may be separated by padding samples (cubes.next_batch_start)
    index = [i for start, stop in cube.batches for i in range(start, stop)]
    by_sample = dict(zip(index, plans, strict=True))
    return [BlockPlan(b, tuple(by_sample[i] for i in range(b.start, b.stop))) for b in blocks]


def _text(value: Any) -> str | None:
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def _time(value: Any):
    return None if value is None or pd.isna(value) else pd.Timestamp(value).to_pydatetime()
