"""Finding 1: a metadata row the reader rejects must never turn a real modality into a generated one.

Four kinds of bad DEM rows (unparseable grid_cell, off-grid grid_cell, centre_lat NaN, nodata inf) in one
source: the run quarantines exactly those four cells (found through the image row group when the row's own
grid_cell is broken), holds them back from the cube and reports them; ``invalid_rows="missing"`` is the
explicit opt-in to the old behaviour and is recorded; fixing the source completes them on the next run.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from copgen.flows.complete import run_complete
from copgen.flows.jobs import CompleteJob, OutputLayout, SourceSpec
from copgen.loop import Origin
from copgen.storage.cubes import Cube
from copgen.storage.ledger import Ledger

from .conftest import sample_keys

pytestmark = pytest.mark.slow

BAD = {0: ("grid_cell", "12X_3Q"), 1: ("grid_cell", "999U_1R"), 2: ("centre_lat", np.nan),
       3: ("nodata", np.inf)}


def _damage(root: str) -> list[str]:
    """Break DEM metadata rows 0-3 (one kind each); returns the cells those rows describe."""
    path = f"{root}/Core-DEM/metadata.parquet"
    shutil.copy(path, path + ".orig")
    table = pq.read_table(path)
    cells = table.column("grid_cell").to_pylist()[:4]
    for row, (name, value) in BAD.items():
        col = table.column(name).to_pylist()
        col[row] = value
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pa.array(col, type=table.schema.field(name).type))
    pq.write_table(table, path)
    return cells


def _run(on_cluster, model, root, meta, out, run_id, **kw):
    src = SourceSpec(root=root, thumbnail_sizes=meta["thumbnail_sizes"])
    return on_cluster(run_complete, job=CompleteJob(
        source=src, out=OutputLayout(str(out)), model=model, run_id=run_id,
        block_samples=8, **kw))


def test_rejected_rows_quarantine_their_cells_and_a_fix_completes_them(on_cluster, model, world_copy,
                                                                       tmp_path):
    root, meta = world_copy
    victims = _damage(root)
    out = tmp_path / "out"
    summary = _run(on_cluster, model, root, meta, out, "r1")

    assert summary["quarantined"] == 4  # exit 3 through the CLI
    records = Ledger(summary["cube"]).quarantined()
    assert sorted(r.grid_cell for r in records) == sorted(victims)  # broken ids found via the image rows
    assert {(r.dataset, r.modality, r.stage) for r in records} == {("Core-DEM", "DEM", "source")}
    assert sorted(r.field for r in records) == ["centre_lat", "grid_cell", "grid_cell", "nodata"]
    assert all(r.file.endswith("Core-DEM/metadata.parquet") and "metadata row" in r.reason for r in records)
    cube = Cube.open(summary["cube"])
    keys = sample_keys(cube)
    assert len(keys) == len(set(keys))  # nothing duplicated
    assert not set(victims) & {k[0] for k in keys}  # held back: nothing generated over their real DEM
    assert cube.done_mask().all()

    # explicit opt-in: the rows count as missing, DEM is generated, and the run says so
    other = _run(on_cluster, model, root, meta, tmp_path / "missing", "r1m", invalid_rows="missing")
    assert other["quarantined"] == 0
    cube_m = Cube.open(other["cube"])
    cells = np.array([k[0] for k in sample_keys(cube_m)])
    dem = cube_m.spec.modalities.index(cube_m.spec.modalities[0])  # DEM is first in canonical order
    origin = np.asarray(cube_m.group["origin"][:])
    assert (origin[np.isin(cells, victims), 1, dem] == Origin.GENERATED).all()
    assert cube_m.group.attrs["copgen_runs"]["r1m"]["invalid_rows"] == "missing"

    # the source is fixed: the next run completes the four cells with their real DEM; records are gone
    shutil.copy(f"{root}/Core-DEM/metadata.parquet.orig", f"{root}/Core-DEM/metadata.parquet")
    before = {n: np.asarray(cube.group[n][:]) for n in ("DEM", "S1RTC", "S2L1C", "S2L2A", "origin")}
    pairs = SourceSpec(root=root, thumbnail_sizes=meta["thumbnail_sizes"]).open().pair().pairs
    incomplete = [v for v in victims if not pairs.complete[pairs.grid_cell == v].item()]
    assert incomplete  # the world leaves some modality of these cells missing: they need completing
    fixed = _run(on_cluster, model, root, meta, out, "r2")
    assert fixed["quarantined"] == 0 and fixed["samples_new"] == len(incomplete)
    assert Ledger(fixed["cube"]).quarantined() == []
    cube = Cube.open(fixed["cube"])
    keys = sample_keys(cube)
    assert len(keys) == len(set(keys)) and set(victims) & {k[0] for k in keys} == set(incomplete)
    new = np.isin([k[0] for k in keys], incomplete)
    assert (np.asarray(cube.group["origin"][:])[new, 0, dem] == Origin.REAL).all()
    for name, old in before.items():  # uint8 arrays: completed work is kept bit for bit
        assert np.array_equal(np.asarray(cube.group[name][: len(old)]), old), name
