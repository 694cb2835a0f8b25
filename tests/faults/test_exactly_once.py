"""Finding 3: exactly-once tables. A crash after a block's table part and before its marker, resumed under a
NEW run id, must not leave the old part beside the new one (it did: 120 provenance rows for 104 keys), and
no temporary file may survive. The crash state is built exactly as a kill between the two writes leaves it:
the part and the arrays are there, the marker is not, and the killed writes left their temporary files."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest
from copgen.flows.complete import run_complete
from copgen.flows.jobs import CompleteJob, OutputLayout
from copgen.storage.cubes import Cube
from copgen.storage.ledger import Ledger

from .conftest import sample_keys

pytestmark = pytest.mark.slow


def _keys(table: Path) -> tuple[int, int]:
    con = duckdb.connect()
    rows, keys = con.execute(
        f"SELECT count(*), count(DISTINCT (sample, iteration, modality)) FROM "
        f"read_parquet('{table}/**/*.parquet', hive_partitioning=true)").fetchone()
    return rows, keys


def test_a_redo_under_a_new_run_id_replaces_the_blocks_table_part(on_cluster, model, source, tmp_path):
    out = OutputLayout(str(tmp_path))
    first = on_cluster(run_complete, job=CompleteJob(
        source=source, out=out, model=model, run_id="run-a", block_samples=2))
    cube = Cube.open(first["cube"])
    blocks = cube.blocks()
    assert len(blocks) >= 2
    arrays = {n: np.asarray(cube.group[n][:]) for n in ("DEM", "S1RTC", "S2L1C", "S2L2A", "origin", "done")}
    table = tmp_path / "tables" / "provenance"
    n_expected = cube.n_samples * cube.spec.iterations * len(cube.spec.modalities)
    assert _keys(table) == (n_expected, n_expected)

    # the crash: block 1's part is written, its marker is not; the killed writes left temporary files
    victim = blocks[1]
    ledger_dir = Path(first["cube"]) / "_ledger" / "blocks"
    (ledger_dir / f"{victim.id}.json").unlink()
    (ledger_dir / f"{victim.id}.json.0123abcd.tmp").write_bytes(b"{\"block\": ")
    part = f"part-complete-{victim.id}.parquet"
    (table / "run_id=run-a" / f".{part}.0123abcd.tmp").write_bytes(b"PAR1")

    second = on_cluster(run_complete, job=CompleteJob(
        source=source, out=out, model=model, run_id="run-b", block_samples=2))
    assert second["blocks_run"] == 1 and second["samples_new"] == 0
    rows, keys = _keys(table)
    assert rows == keys == n_expected  # each (sample, iteration, modality) exactly once
    parts = sorted(p.relative_to(table).as_posix() for p in table.rglob(f"*{victim.id}*"))
    assert parts == [f"run_id=run-b/{part}"]  # the redo's part replaced the crashed run's
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary file survives the resume
    cube = Cube.open(second["cube"])
    keys = sample_keys(cube)
    assert len(keys) == len(set(keys)) and cube.done_mask().all()
    for name, old in arrays.items():  # uint8 arrays recomputed with the same seeds: identical bytes
        assert np.array_equal(np.asarray(cube.group[name][:]), old), name
    assert Ledger(second["cube"]).pending_blocks(cube) == []
