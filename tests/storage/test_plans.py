"""The plan beside a cube: SamplePlans survive the store unchanged, old plans still read, keys match."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import pytest
from copgen.modalities import Modality
from copgen.records import BlockPlan, CellRecord, RecordError, SampleKey, SourceRef, WorkBlock, expand_cells
from copgen.storage import plans
from copgen.storage.cubes import Cube, CubeSpec

T0 = datetime(2021, 6, 1, 10, 30, 15, tzinfo=UTC)


def _cells() -> list[CellRecord]:
    s2 = SourceRef(Modality.S2L2A, "1U_2R", "s3://b/Core-S2L2A/images/part_00001.parquet", 3, "S2B_X", T0)
    dem = SourceRef(Modality.DEM, "1U_2R", "/d/Core-DEM/images/part_00000.parquet", 0, "DEM_1", None)
    s1 = SourceRef(Modality.S1RTC, "2U_2R", "/d/Core-S1RTC/images/part_00002.parquet", 7, None, T0)
    return [CellRecord("1U_2R", 10.5, 20.25, (dem, s2)), CellRecord("2U_2R", 11.0, -1.0, (s1,))]


def test_plans_round_trip_through_the_cube_store(tmp_path):
    samples = expand_cells(_cells(), ["center", "3"], 2, [(Modality.S1RTC,), (Modality.S2L2A, Modality.DEM)])
    assert [s.key for s in samples[:3]] == [SampleKey("1U_2R", "center", 0), SampleKey("1U_2R", "center", 1),
                                           SampleKey("1U_2R", "3", 0)]
    assert samples[-1].targets == (Modality.DEM, Modality.S2L2A)  # canonical order
    cube = Cube.create(str(tmp_path / "c.zarr"), CubeSpec(tile_size=8, block_samples=4))
    plans.write_plan(cube, 0, len(samples), samples, None)
    cube.grow([s.key.grid_cell for s in samples], [s.key.patch for s in samples],
              variants=[s.key.variant for s in samples])
    back = plans.read_plan(cube, None)
    assert back == samples
    assert back[0].source(Modality.S2L2A).timestamp == T0 and back[0].source(Modality.S1RTC) is None
    assert cube.sample_keys() == [s.key for s in samples]
    (first, second) = plans.block_plans(cube, cube.blocks(), None)
    assert first.keys == tuple(s.key for s in samples[:4]) and second.block == WorkBlock(4, 8)
    with pytest.raises(RecordError, match="3 sample plans for 4 samples"):
        BlockPlan(WorkBlock(0, 4), samples[:3])


def test_a_plan_without_a_modalitys_columns_reads_as_absent():
    """First-release plans carried only the source's modalities (and ``-1`` rows for the others)."""
    df = pd.DataFrame({"grid_cell": ["1U_2R"], "patch": ["center"], "variant": [0], "centre_lat": [1.0],
                       "centre_lon": [2.0], "S2L2A_present": [True], "S2L2A_file": ["f.parquet"],
                       "S2L2A_row": [4], "S1RTC_present": [False], "S1RTC_file": [None], "S1RTC_row": [-1],
                       "targets": ["S1RTC,DEM"]})
    (plan,) = plans.from_frame(df)
    assert plan.present == {Modality.S2L2A} and plan.source(Modality.S2L2A).row_group == 4
    assert plan.targets == (Modality.S1RTC, Modality.DEM)


def test_a_missing_plan_is_a_one_line_error(tmp_path):
    cube = Cube.create(str(tmp_path / "c.zarr"), CubeSpec(tile_size=8, block_samples=4))
    cube.grow(["1U_2R"], ["center"])
    with pytest.raises(plans.PlanError, match=r"plan of samples \[0, 1\) is missing"):
        plans.read_plan(cube, None)
