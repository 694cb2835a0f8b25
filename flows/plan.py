"""Driver side: turn paired Major TOM cells into the cube's sample plans.

A :class:`~copgen.records.SamplePlan` is one cube sample: its key (cell, patch, variant), its cell's
centre, the real thumbnails it can read (``SourceRef`` per present modality) and the modalities to
generate. ``grow_with_plan`` stores the plans beside the cube (``copgen.storage.plans``) before the cube
grows; the flows then read the pending blocks' :class:`~copgen.records.BlockPlan` back from there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from copgen.flows.jobs import JobError, patches_for
from copgen.modalities import ALL, Modality
from copgen.records import CellRecord, SamplePlan, WorkBlock, expand_cells
from copgen.storage.cubes import Cube
from copgen.storage.georef import sample_epsg, tile_georef
from copgen.storage.plans import to_frame, write_plan


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
    targets = []
    for cell in cells:
        present = cell.present
        chosen = [m for m in wanted if regenerate_present or m not in present]
        # Generating needs at least one real modality left to condition on.
        if present and not (present - set(chosen)):
            chosen = [m for m in chosen if m not in present]
        targets.append(tuple(chosen))
    return targets


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
    have = set(cube.sample_keys()) if cube.n_samples else set()
    return [s for s in samples if s.key not in have]


def grow_with_plan(cube: Cube, samples: Sequence[SamplePlan], storage_options,
                   thumbnail_px: int | None = None) -> list[WorkBlock]:
    """Append ``samples`` to the cube and store them as the plan of the new batch. Each sample is
    georeferenced in the CRS of its source products (``sample_epsg``), cut from ``thumbnail_px``
    thumbnails (default: the published 1068 px)."""
    if not samples:
        return []
    start = cube.next_batch_start()
    # The plan goes first: a grow without its plan would leave blocks nobody can resume.
    write_plan(cube, start, start + len(samples), samples, storage_options)
    georef = None
    if any(s.tile is not None for s in samples):  # GeoTIFF tiles: each georeferenced by its own file
        georef = tile_georef([s.tile.epsg for s in samples], [s.tile.transform for s in samples],
                             [s.tile.px for s in samples], [s.key.patch for s in samples],
                             cube.spec.tile_size)
    return cube.grow([s.key.grid_cell for s in samples], [s.key.patch for s in samples],
                     [s.centre_lat for s in samples], [s.centre_lon for s in samples],
                     variants=[s.key.variant for s in samples],
                     epsg=sample_epsg(to_frame(samples)) if georef is None else None,
                     thumbnail_px=thumbnail_px, georef=georef)


def source_thumbnail_px(source) -> int | None:
    """The S1/S2 thumbnail side of a ``SourceSpec`` (a small synthetic world's), None = published."""
    sizes = [int(v) for m, v in (source.thumbnail_sizes or {}).items() if m != "DEM" and int(v) > 0]
    return max(sizes) if sizes else None
