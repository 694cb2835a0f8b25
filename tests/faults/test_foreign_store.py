"""Finding 2: a store at the output path that is not our cube (or is ours with another schema) is refused
(exit 2) and left untouched, byte for byte; creation happens only under the lease."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from copgen.flows.complete import run_complete
from copgen.flows.failures import classify
from copgen.flows.jobs import CompleteJob, OutputLayout
from copgen.storage.cubes import Cube, CubeError, CubeExistsError, CubeSpec, ForeignStoreError

from .conftest import tree_bytes

pytestmark = pytest.mark.slow


def test_a_users_zarr_group_is_refused_and_untouched(on_cluster, model, source, tmp_path):
    target = tmp_path / "complete.zarr"
    group = zarr.open_group(str(target), mode="w", zarr_format=3)
    group.attrs["owner"] = "a user's own data"
    group.create_array("x", shape=(4,), dtype="uint8")[:] = np.arange(4, dtype="uint8")
    before = tree_bytes(target)
    with pytest.raises(ForeignStoreError, match="not a copgen cube") as err:
        on_cluster(run_complete, job=CompleteJob(
            source=source, out=OutputLayout(str(tmp_path)), model=model, run_id="f1"))
    assert classify(err.value).exit_code == 2
    assert tree_bytes(target) == before  # no lease, no ledger, no attribute or array touched


def test_our_cube_with_another_schema_is_refused_and_untouched(on_cluster, model, source, tmp_path):
    url = str(tmp_path / "complete.zarr")
    Cube.create(url, CubeSpec(tile_size=8, iterations=3, block_samples=4))
    before = tree_bytes(tmp_path / "complete.zarr")
    with pytest.raises(CubeExistsError, match="another schema") as err:
        on_cluster(run_complete, job=CompleteJob(
            source=source, out=OutputLayout(str(tmp_path)), model=model, run_id="f2"))
    assert classify(err.value).exit_code == 2
    # the lease was taken and released inside the ledger; the cube's own objects are unchanged
    after = {k: v for k, v in tree_bytes(tmp_path / "complete.zarr").items() if not k.startswith("_ledger")}
    assert after == before


def test_create_never_writes_over_files_or_foreign_groups(tmp_path):
    plain = tmp_path / "notes.zarr"
    plain.mkdir()
    (plain / "README").write_text("mine")
    with pytest.raises(ForeignStoreError):
        Cube.create(str(plain), CubeSpec(tile_size=8))
    assert (plain / "README").read_text() == "mine" and sorted(p.name for p in plain.iterdir()) == ["README"]
    afile = tmp_path / "file.zarr"
    afile.write_bytes(b"x")
    with pytest.raises(CubeError):
        Cube.create(str(afile), CubeSpec(tile_size=8))
    assert afile.read_bytes() == b"x"
    # what an interrupted create of ours leaves (ledger and plan only) is not foreign
    ours = tmp_path / "ours.zarr"
    (ours / "_ledger").mkdir(parents=True)
    assert Cube.create(str(ours), CubeSpec(tile_size=8)).n_samples == 0
