"""Planning at scale: columns in the driver, bounded batches, and each block reading only its own plan rows.

The batch size is shrunk (``PLAN_BATCH_BLOCKS``) so that a few dozen cells span several batches; the plan
must be the same samples, in the same order, with the same sources and targets, as one whole-run grow.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from copgen.flows import plan
from copgen.flows.plan import completion_targets, grow_planned, pairs_targets, sample_plans
from copgen.modalities import ALL, Modality
from copgen.records import CellRecord
from copgen.storage import plans
from copgen.storage.cubes import Cube, CubeSpec
from copgen.storage.majortom.reader import cell_records


def _pairs(n: int) -> pd.DataFrame:
    """A pairs table as the reader returns it: every presence pattern occurs (incl. nothing present)."""
    cells = [f"{r}U_{c}R" for r in range(1, 2 + n // 5) for c in range(1, 6)][:n]
    df = pd.DataFrame({"grid_cell": cells, "centre_lat": np.linspace(40, 41, n),
                       "centre_lon": np.linspace(8, 9, n)})
    for j, m in enumerate(ALL):
        present = np.array([(k >> j) & 1 == 1 for k in range(n)])
        df[f"{m.name}_present"] = present
        df[f"{m.name}_file"] = [f"/d/{m.dataset}/images/part_{k % 3:05d}.parquet" if p else None
                                for k, p in enumerate(present)]
        df[f"{m.name}_row"] = pd.array([k if p else None for k, p in enumerate(present)], dtype="Int64")
        df[f"{m.name}_product_id"] = [f"P{m.name}{k}" if p else None for k, p in enumerate(present)]
        df[f"{m.name}_timestamp"] = pd.to_datetime(["2021-06-01" if p else None for p in present], utc=True)
        df[f"{m.name}_crs"] = ["EPSG:32632" if p else None for p in present]
        df[f"{m.name}_cloud_cover"] = np.where(present, 5.0, np.nan)
    return df


def _to_cells(rows: pd.DataFrame) -> list[CellRecord]:
    return cell_records(rows, ALL)


@pytest.mark.parametrize("generate,regenerate", [(None, False), ((Modality.DEM, Modality.S1RTC), True),
                                                 ((Modality.S2L2A,), False)])
def test_targets_from_columns_equal_the_per_record_decision(generate, regenerate):
    pairs = _pairs(32)  # all 16 presence patterns, twice
    by_column = pairs_targets(pairs, generate, regenerate)
    by_record = completion_targets(_to_cells(pairs), generate, regenerate)
    assert list(by_column) == by_record
    assert by_column[0] == (generate or ALL)  # nothing real: unconditional, every wanted modality
    assert by_column[15] == (tuple(generate) if regenerate else ())  # all real: only what is regenerated
    assert pairs_targets(pairs.drop(columns=[c for c in pairs if c.startswith("DEM_")]), None, False)[1] == \
        completion_targets(cell_records(pairs.iloc[[1]], [m for m in ALL if m is not Modality.DEM]), None,
                           False)[0]  # a modality without columns counts as absent


def _grow(tmp_path, name: str, batch_blocks: int, monkeypatch, pairs, patch_mode="grid") -> Cube:
    monkeypatch.setattr(plan, "PLAN_BATCH_BLOCKS", batch_blocks)
    monkeypatch.setattr(plans, "ROW_GROUP_BLOCKS", 2)
    cube = Cube.create(str(tmp_path / f"{name}.zarr"), CubeSpec(tile_size=8, iterations=2, block_samples=8))
    targets = pairs_targets(pairs, None, False)
    added = grow_planned(cube, pairs, targets, _to_cells, patch_mode, 2, None, thumbnail_px=64)
    assert added == sum(1 for t in targets if t) * 16 * 2
    return Cube.open(cube.url)


def test_batched_plan_is_the_whole_run_plan_and_blocks_read_only_their_rows(tmp_path, monkeypatch):
    pairs = _pairs(20)  # 19 cells with targets (one has nothing to condition on) x 16 patches x 2 seeds
    whole = _grow(tmp_path, "whole", 512, monkeypatch, pairs)
    batched = _grow(tmp_path, "batched", 3, monkeypatch, pairs)  # at most 24 samples per batch
    assert len(whole.batches) == 1 and len(batched.batches) == -(-608 // 24)
    assert all(b - a <= 24 for a, b in batched.batches)
    assert batched.sample_keys() == whole.sample_keys()
    # the same georeferencing: coordinates are the cube's output (exact: the same float64 computation)
    for name in ("centre_lat", "centre_lon", "epsg", "transform"):
        np.testing.assert_array_equal(batched.group[name][:], whole.group[name][:])
    expected = sample_plans(_to_cells(pairs), "grid", 2, list(pairs_targets(pairs, None, False)))
    expected = [s for s in expected if s.targets]
    assert plans.read_plan(batched, None) == expected
    first = batched.batches[0]
    meta = pq.ParquetFile(tmp_path / "batched.zarr" / "_plan" / f"{first[0]:010d}-{first[1]:010d}.parquet")
    assert [meta.metadata.row_group(g).num_rows for g in range(meta.metadata.num_row_groups)] == [16, 8]
    refs = plans.plan_refs(batched, batched.blocks(), None)
    for ref in refs:
        got = ref.load()
        assert got.block == ref.block and list(got.samples) == expected[ref.block.start:ref.block.stop]


def test_plans_written_in_one_row_group_still_read_per_block(tmp_path):
    """Cubes planned before row groups per block: a block's rows are cut from the whole object."""
    pairs = _pairs(4)
    cube = Cube.create(str(tmp_path / "old.zarr"), CubeSpec(tile_size=8, iterations=2, block_samples=4))
    samples = [s for s in sample_plans(_to_cells(pairs), "grid", 1, list(pairs_targets(pairs, None, False)))
               if s.targets]
    frame = plans.to_frame(samples)
    (tmp_path / "old.zarr" / "_plan").mkdir()
    frame.to_parquet(tmp_path / "old.zarr" / "_plan" / f"{0:010d}-{len(samples):010d}.parquet", index=False)
    cube.grow([s.key.grid_cell for s in samples], [s.key.patch for s in samples],
              variants=[s.key.variant for s in samples])
    for block, ref in itertools.zip_longest(cube.blocks(), plans.plan_refs(cube, cube.blocks(), None)):
        assert list(ref.load().samples) == samples[block.start:block.stop]


def test_a_missing_plan_object_fails_in_the_driver(tmp_path):
    cube = Cube.create(str(tmp_path / "c.zarr"), CubeSpec(tile_size=8, block_samples=4))
    cube.grow(["1U_2R"], ["center"])
    with pytest.raises(plans.PlanError, match=r"plan of samples \[0, 1\) is missing"):
        plans.plan_refs(cube, cube.blocks(), None)


def test_a_rerun_adds_only_new_samples_whatever_the_key_kind(tmp_path, monkeypatch):
    from copgen.flows.plan import CubeKeys, _key_codes
    from copgen.records import SampleKey, SamplePlan

    pairs = _pairs(20)
    cube = _grow(tmp_path, "rerun", 3, monkeypatch, pairs.iloc[:12])
    before = cube.sample_keys()
    targets = pairs_targets(pairs, None, False)
    added = grow_planned(cube, pairs, targets, _to_cells, "grid", 2, None, thumbnail_px=64)
    cube = Cube.open(cube.url)
    assert added == sum(1 for t in targets[12:] if t) * 32 and cube.sample_keys()[:len(before)] == before
    assert grow_planned(cube, pairs, targets, _to_cells, "grid", 2, None, thumbnail_px=64) == 0
    assert len(set(cube.sample_keys())) == cube.n_samples  # nothing planned twice

    def plan_of(cell: str, patch: str = "center", variant: int = 0) -> SamplePlan:
        return SamplePlan(SampleKey(cell, patch, variant), 0.0, 0.0)

    # exact codes: one per distinct key; ids that are not canonical grid cells get none
    assert len(set(_key_codes(["1U_1R", "1U_2R", "1D_1R", "1U_1L"], ["center", "0", "15", "center"],
                              [0, 1, 2, (1 << 24) - 1]).tolist())) == 4
    for cells, patches, variants in ((["01U_1R"], ["center"], [0]), (["tile_a"], ["center"], [0]),
                                     (["1U_1R"], ["16"], [0]), (["1U_1R"], ["center"], [1 << 24])):
        assert _key_codes(cells, patches, variants) is None
    keys = CubeKeys(cube)
    assert keys.keys is None and len(keys.codes) == cube.n_samples
    held = cube.sample_keys()[5]
    fresh = [plan_of(held.grid_cell, held.patch, held.variant), plan_of("01U_1R"), plan_of("tile_a"),
             plan_of(held.grid_cell, held.patch, held.variant + 7)]
    assert [s.key for s in keys.new(fresh)] == [s.key for s in fresh[1:]]
    # a cube of tile names (a GeoTIFF tile folder): the same answers from a set of keys
    tiles = Cube.create(str(tmp_path / "tiles.zarr"), CubeSpec(tile_size=8, iterations=2, block_samples=4))
    from copgen.storage.georef import tile_georef

    transform = "[500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0]"
    tiles.grow(["tile_a", "tile_b"], ["center", "center"],
               georef=tile_georef([32632] * 2, [transform] * 2, [64] * 2, ["center"] * 2, 8))
    tkeys = CubeKeys(Cube.open(tiles.url))
    assert tkeys.keys == {SampleKey("tile_a", "center"), SampleKey("tile_b", "center")}
    assert [s.key.grid_cell for s in tkeys.new([plan_of("tile_a"), plan_of("tile_c"), plan_of("1U_1R")])] \
        == ["tile_c", "1U_1R"]
