"""Driver side: turn paired Major TOM cells into the cube's sample plans.

A :class:`~copgen.records.SamplePlan` is one cube sample: its key (cell, patch, variant), its cell's
centre, the real thumbnails it can read (``SourceRef`` per present modality) and the modalities to
generate. ``grow_with_plan`` stores the plans beside the cube (``copgen.storage.plans``) before the cube
grows; each block task then reads its own :class:`~copgen.records.BlockPlan` back from there.

At Major TOM scale (~2.2 M cells per modality) the driver plans in bounded memory: the paired cells stay
columns (the reader's ``pairs`` table), targets are decided once per pattern of present modalities, and
records exist only for one batch of at most ``PLAN_BATCH_BLOCKS`` work blocks at a time
(:func:`grow_planned`); benchmarks/ingest.py ``--plan-cells`` measures it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from copgen.flows.jobs import JobError, patches_for
from copgen.modalities import ALL, Modality
from copgen.records import CellRecord, SampleKey, SamplePlan, WorkBlock, expand_cells
from copgen.storage.cubes import Cube
from copgen.storage.georef import sample_epsg, tile_georef
from copgen.storage.plans import write_plan

PLAN_BATCH_BLOCKS = 512  # work blocks per grow and per plan object (16,384 samples at 32 per block)


def sample_plans(cells: Sequence[CellRecord], patch_mode: str, samples_per_cell: int,
                 targets: Sequence[Iterable[Modality]] | None = None) -> list[SamplePlan]:
    """Expand cells into samples (cell x patch x variant), in cell order; ``targets`` per cell."""
    if samples_per_cell < 1:
        raise JobError(f"--samples-per-cell {samples_per_cell}: must be >= 1")
    targets = [()] * len(cells) if targets is None else targets
    return expand_cells(cells, patches_for(patch_mode), samples_per_cell, targets)


def completion_targets(cells: Sequence[CellRecord], generate: Sequence[Modality] | None,
                       regenerate_present: bool) -> list[tuple[Modality, ...]]:
    """Per cell, the modalities to generate: the missing ones (of ``generate``, default all), plus the
    present ones of ``generate`` when ``regenerate_present`` (augmentation corpora)."""
    wanted = tuple(generate) if generate else ALL
    return [_targets(cell.present, wanted, regenerate_present) for cell in cells]


def pairs_targets(pairs: pd.DataFrame, generate: Sequence[Modality] | None,
                  regenerate_present: bool) -> np.ndarray:
    """:func:`completion_targets` on the columns of a ``pairs`` table (``M_present``; a modality without
    the column is absent): one decision per pattern of present modalities (at most 16), not one record
    per cell. An object array of target tuples, one per row."""
    wanted = tuple(generate) if generate else ALL
    code = np.zeros(len(pairs), dtype=np.int64)
    for j, m in enumerate(ALL):
        if f"{m.name}_present" in pairs:
            code |= pairs[f"{m.name}_present"].fillna(False).to_numpy(dtype=bool).astype(np.int64) << j
    labels = np.empty(1 << len(ALL), dtype=object)
    for c in range(len(labels)):
        present = frozenset(m for j, m in enumerate(ALL) if c >> j & 1)
        labels[c] = _targets(present, wanted, regenerate_present)
    return labels[code]


def _targets(present: frozenset[Modality], wanted: Sequence[Modality], regenerate_present: bool
             ) -> tuple[Modality, ...]:
    chosen = [m for m in wanted if regenerate_present or m not in present]
    # Generating needs at least one real modality left to condition on.
    if present and not (present - set(chosen)):
        chosen = [m for m in chosen if m not in present]
    return tuple(chosen)


def grow_planned(cube: Cube, pairs: pd.DataFrame, targets: np.ndarray,
                 to_cells: Callable[[pd.DataFrame], list[CellRecord]], patch_mode: str, samples_per_cell: int,
                 storage_options, thumbnail_px: int | None = None) -> int:
    """Plan the rows of ``pairs`` that have targets (``targets``: :func:`pairs_targets`) and grow the cube
    with the samples it does not hold yet, in cell order; returns how many were added. Records
    (``to_cells``: the pairing's ``cells``) exist for one batch of cells at a time: the driver's memory
    is the pairs table plus one batch, however many cells a run plans."""
    rows = np.flatnonzero(np.fromiter((bool(t) for t in targets), dtype=bool, count=len(targets)))
    step = cube.spec.block_samples * PLAN_BATCH_BLOCKS
    per_cell = len(patches_for(patch_mode)) * samples_per_cell
    have = CubeKeys(cube)
    pending: list[SamplePlan] = []
    added = 0
    for lo in range(0, len(rows), max(1, step // per_cell)):
        idx = rows[lo:lo + max(1, step // per_cell)]
        samples = sample_plans(to_cells(pairs.iloc[idx]), patch_mode, samples_per_cell, list(targets[idx]))
        pending += have.new(samples)
        if len(pending) >= step:  # full batches now, the rest with the next cells
            full = len(pending) // step * step
            grow_with_plan(cube, pending[:full], storage_options, thumbnail_px)
            added, pending = added + full, pending[full:]
    grow_with_plan(cube, pending, storage_options, thumbnail_px)
    return added + len(pending)


def split_cells(cells: Sequence[CellRecord], n_loop: int | None, n_reference: int | None,
                seed: int) -> tuple[list[CellRecord], list[CellRecord]]:
    """Deterministic split of complete cells into loop cells and a disjoint held-out reference set."""
    def rank(cell: CellRecord) -> int:
        digest = hashlib.blake2b(f"{seed}|{cell.grid_cell}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    shuffled = sorted(cells, key=rank)
    total = len(shuffled)
    if n_loop is None:
        n_loop = total // 2 if n_reference is None else total - n_reference
    n_loop = min(n_loop, total)
    n_ref = min(total - n_loop, n_loop if n_reference is None else n_reference)
    by_cell = lambda c: c.grid_cell  # noqa: E731
    return sorted(shuffled[:n_loop], key=by_cell), sorted(shuffled[n_loop:n_loop + n_ref], key=by_cell)


def new_samples(cube: Cube, samples: Sequence[SamplePlan]) -> list[SamplePlan]:
    """The samples the cube does not hold yet (incremental runs)."""
    return CubeKeys(cube).new(samples)


_PATCH_CODES = {"center": 16, **{str(p): p for p in range(16)}}
_VARIANT_BITS = 24


def _key_codes(cells, patches, variants) -> np.ndarray | None:
    """Exact int64 codes of sample keys (signed grid row and column, patch, variant: 13+13+5+24 bits), or
    ``None`` when one key is not a canonical Major TOM cell id, a known patch label and a small variant."""
    from copgen.storage.majortom import grid

    cells = np.asarray(cells, dtype=object)
    if not len(cells):
        return np.empty(0, dtype=np.int64)
    try:
        rows, cols = grid.parse_cell(cells)
        canonical = np.all(grid.format_cell(rows, cols) == cells.astype(str))  # one string, one code
        patch = np.array([_PATCH_CODES.get(str(p), -1) for p in patches], dtype=np.int64)
    except (grid.GridError, ValueError, TypeError):
        return None
    var = np.asarray(variants, dtype=np.int64)
    if not canonical or (patch < 0).any() or (var < 0).any() or (var >= 1 << _VARIANT_BITS).any():
        return None
    return ((((rows + 4096) << 13 | (cols + 4096)) << 5 | patch) << _VARIANT_BITS) | var


class CubeKeys:
    """The sample keys a cube holds, for "is it new?" at Major TOM scale: 8 bytes per held sample (exact
    integer codes, :func:`_key_codes`), read batch by batch; a set of :class:`SampleKey` where a key has
    no code (a tile folder's cell names)."""

    def __init__(self, cube: Cube) -> None:
        self.codes = np.empty(0, dtype=np.int64)
        self.keys: set | None = None
        parts = []
        group = cube.group if cube.n_samples else None
        for a, b in cube.batches:
            code = _key_codes(group["grid_cell"][a:b], group["patch"][a:b], group["variant"][a:b])
            if code is None:
                self.keys = set(cube.sample_keys())
                return
            parts.append(code)
        if parts:
            self.codes = np.sort(np.concatenate(parts))

    def new(self, samples: Sequence[SamplePlan]) -> list[SamplePlan]:
        """The samples whose key the cube does not hold, in order."""
        if self.keys is not None:
            return [s for s in samples if s.key not in self.keys]
        if not len(self.codes):
            return list(samples)
        code = _key_codes([s.key.grid_cell for s in samples], [s.key.patch for s in samples],
                          [s.key.variant for s in samples])
        if code is None:  # some keys have no code: they cannot equal a held key (every held one has one)
            code = np.array([_one_code(s.key) for s in samples], dtype=np.int64)
        at = np.minimum(np.searchsorted(self.codes, code), len(self.codes) - 1)
        held = (self.codes[at] == code) & (code >= 0)
        return [s for s, h in zip(samples, held, strict=True) if not h]


def _one_code(key: SampleKey) -> int:
    code = _key_codes([key.grid_cell], [key.patch], [key.variant])
    return -1 if code is None else int(code[0])


def grow_with_plan(cube: Cube, samples: Sequence[SamplePlan], storage_options,
                   thumbnail_px: int | None = None) -> list[WorkBlock]:
    """Append ``samples`` to the cube and store them as the plan of the new batch. Each sample is
    georeferenced in the CRS of its source products (``sample_epsg``), cut from ``thumbnail_px``
    thumbnails (default: the published 1068 px). More than ``PLAN_BATCH_BLOCKS`` blocks of samples go in
    several batches (one plan object and one grow each): every list built here stays bounded."""
    step = cube.spec.block_samples * PLAN_BATCH_BLOCKS
    if len(samples) > step:
        return [b for lo in range(0, len(samples), step)
                for b in grow_with_plan(cube, samples[lo:lo + step], storage_options, thumbnail_px)]
    if not samples:
        return []
    start = cube.next_batch_start()
    # The plan goes first: a grow without its plan would leave blocks nobody can resume.
    frame = write_plan(cube, start, start + len(samples), samples, storage_options)
    georef = None
    if any(s.tile is not None for s in samples):  # GeoTIFF tiles: each georeferenced by its own file
        georef = tile_georef([s.tile.epsg for s in samples], [s.tile.transform for s in samples],
                             [s.tile.px for s in samples], [s.key.patch for s in samples],
                             cube.spec.tile_size)
    return cube.grow([s.key.grid_cell for s in samples], [s.key.patch for s in samples],
                     [s.centre_lat for s in samples], [s.centre_lon for s in samples],
                     variants=[s.key.variant for s in samples],
                     epsg=sample_epsg(frame) if georef is None else None,
                     thumbnail_px=thumbnail_px, georef=georef)


def source_thumbnail_px(source) -> int | None:
    """The S1/S2 thumbnail side of a ``SourceSpec`` (a small synthetic world's), None = published."""
    sizes = [int(v) for m, v in (source.thumbnail_sizes or {}).items() if m != "DEM" and int(v) > 0]
    return max(sizes) if sizes else None
