"""Driver side: turn paired Major TOM cells into cube samples, and remember the plan beside the cube.

A plan row is one cube sample: ``grid_cell, patch, variant, centre_lat, centre_lon, targets`` plus, per
modality M, where its real thumbnail lives (``M_present, M_file, M_row, M_product_id, M_timestamp``).
Each grow of a cube stores its rows as ``<cube>/_plan/<start>-<stop>.parquet``; a resumed run re-reads
them for the blocks the ledger says are pending, so resuming never depends on the source being re-paired
the same way.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence

import fsspec
import numpy as np
import pandas as pd
from copgen.flows.jobs import JobError, patches_for
from copgen.modalities import ALL, Modality
from copgen.storage.cubes import Block, Cube
from copgen.storage.fsutil import join_url
from copgen.storage.georef import sample_epsg, tile_georef

PLAN_DIR = "_plan"
_PER_MODALITY = ("present", "file", "row", "product_id", "timestamp", "crs", "cloud_cover")


def sample_rows(
    cells: pd.DataFrame, patch_mode: str, samples_per_cell: int, targets: Sequence[str]
) -> pd.DataFrame:
    """Expand cells into samples (cell × patch × variant), in cell order; ``targets`` per cell."""
    if samples_per_cell < 1:
        raise JobError(f"--samples-per-cell {samples_per_cell}: must be >= 1")
    patches = patches_for(patch_mode)
    tile_cols = [c for c in ("tile_epsg", "tile_transform", "tile_px") if c in cells.columns]
    cols = ["grid_cell", "centre_lat", "centre_lon", *tile_cols] + [
        f"{m.name}_{f}" for m in ALL for f in _PER_MODALITY if f"{m.name}_{f}" in cells.columns]
    base = cells[cols].copy()
    base["targets"] = list(targets)
    n_rep = len(patches) * samples_per_cell
    out = base.loc[base.index.repeat(n_rep)].reset_index(drop=True)
    out.insert(1, "patch", np.tile(np.repeat(patches, samples_per_cell), len(base)))
    out.insert(2, "variant", np.tile(np.arange(samples_per_cell, dtype=np.int32), len(base) * len(patches)))
    for m in ALL:  # a source without a modality: absent everywhere
        if f"{m.name}_present" not in out:
            out[f"{m.name}_present"] = False
            out[f"{m.name}_file"] = None
            out[f"{m.name}_row"] = -1
    return out


def completion_targets(pairs: pd.DataFrame, generate: Sequence[Modality] | None,
                       regenerate_present: bool) -> list[str]:
    """Per cell, the modalities to generate: the missing ones (of ``generate``, default all), plus the
    present ones of ``generate`` when ``regenerate_present`` (augmentation corpora)."""
    wanted = tuple(generate) if generate else ALL
    targets = []
    for row in pairs.itertuples(index=False):
        present = {m for m in ALL if bool(getattr(row, f"{m.name}_present", False))}
        chosen = [m for m in wanted if regenerate_present or m not in present]
        # Generating needs at least one real modality left to condition on.
        if present and not (present - set(chosen)):
            chosen = [m for m in chosen if m not in present]
        targets.append(",".join(m.name for m in chosen))
    return targets


def split_cells(cells: pd.DataFrame, n_loop: int | None, n_reference: int | None, seed: int):
    """Deterministic split of complete cells into loop cells and a disjoint held-out reference set."""
    key = [int.from_bytes(hashlib.blake2b(f"{seed}|{c}".encode(), digest_size=8).digest(), "little")
           for c in cells["grid_cell"]]
    shuffled = cells.assign(_k=key).sort_values("_k").drop(columns="_k").reset_index(drop=True)
    total = len(shuffled)
    if n_loop is None:
        n_loop = total // 2 if n_reference is None else total - n_reference
    n_loop = min(n_loop, total)
    n_ref = min(total - n_loop, n_loop if n_reference is None else n_reference)
    loop = shuffled.iloc[:n_loop].sort_values("grid_cell").reset_index(drop=True)
    ref = shuffled.iloc[n_loop:n_loop + n_ref].sort_values("grid_cell").reset_index(drop=True)
    return loop, ref


def existing_keys(cube: Cube) -> set[tuple[str, str, int]]:
    """(grid_cell, patch, variant) of every sample the cube already holds."""
    if cube.n_samples == 0:
        return set()
    g = cube.group
    return set(zip((str(c) for c in g["grid_cell"][:]), (str(p) for p in g["patch"][:]),
                   (int(v) for v in g["variant"][:]), strict=True))


def new_rows(cube: Cube, rows: pd.DataFrame) -> pd.DataFrame:
    """The rows the cube does not hold yet (incremental runs)."""
    have = existing_keys(cube)
    if not have:
        return rows
    keep = [(c, str(p), int(v)) not in have for c, p, v in zip(rows.grid_cell, rows.patch, rows.variant,
                                                                  strict=True)]
    return rows[keep].reset_index(drop=True)


def grow_with_plan(cube: Cube, rows: pd.DataFrame, storage_options, thumbnail_px: int | None = None
                   ) -> list[Block]:
    """Append ``rows`` to the cube and store them as the plan of the new batch. Each sample is
    georeferenced in the CRS of its source products (``sample_epsg``), cut from ``thumbnail_px``
    thumbnails (default: the published 1068 px)."""
    if rows.empty:
        return []
    start = cube.next_batch_start()
    # The plan goes first: a grow without its plan would leave blocks nobody can resume.
    _write_plan(cube.url, start, start + len(rows), rows, storage_options)
    georef = None
    if "tile_transform" in rows:  # GeoTIFF tiles: each georeferenced by its own file
        georef = tile_georef(rows.tile_epsg, rows.tile_transform, rows.tile_px, rows.patch,
                             cube.spec.tile_size)
    return cube.grow(list(rows.grid_cell), list(rows.patch), list(rows.centre_lat), list(rows.centre_lon),
                     variants=list(rows.variant), epsg=sample_epsg(rows) if georef is None else None,
                     thumbnail_px=thumbnail_px, georef=georef)


def source_thumbnail_px(source) -> int | None:
    """The S1/S2 thumbnail side of a ``SourceSpec`` (a small synthetic world's), None = published."""
    sizes = [int(v) for m, v in (source.thumbnail_sizes or {}).items() if m != "DEM" and int(v) > 0]
    return max(sizes) if sizes else None


def _plan_url(cube_url: str, start: int, stop: int) -> str:
    return join_url(cube_url, PLAN_DIR, f"{start:010d}-{stop:010d}.parquet")


def _write_plan(cube_url: str, start: int, stop: int, rows: pd.DataFrame, storage_options) -> None:
    buf = io.BytesIO()
    rows.to_parquet(buf, index=False)
    with fsspec.open(_plan_url(cube_url, start, stop), "wb", **dict(storage_options or {})) as f:
        f.write(buf.getvalue())


def read_plan(cube: Cube, storage_options) -> pd.DataFrame:
    """The plan rows of every batch of the cube, indexed by cube sample."""
    parts = []
    for start, stop in cube.batches:
        url = _plan_url(cube.url, start, stop)
        try:
            with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
                part = pd.read_parquet(io.BytesIO(f.read()))
        except FileNotFoundError:
            raise JobError(f"cube {cube.url}: the plan of samples [{start}, {stop}) is missing ({url}); "
                           "it cannot be resumed: write to a new --out") from None
        part.index = pd.RangeIndex(start, stop)  # batches may be separated by padding samples
        parts.append(part)
    return pd.concat(parts) if parts else pd.DataFrame()

