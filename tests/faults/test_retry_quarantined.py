"""``--retry-quarantined``: after the source is fixed, the samples a block quarantined are re-read and
completed; the block's other samples are recomputed with their seeds, i.e. rewritten with the same bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from copgen.flows.complete import run_complete
from copgen.flows.jobs import CompleteJob, OutputLayout, SourceSpec
from copgen.storage.cubes import Cube
from copgen.storage.ledger import Ledger

from .conftest import sample_keys

pytestmark = pytest.mark.slow


def test_retry_quarantined_completes_fixed_samples(on_cluster, model, corrupt_world, tiny_world, tmp_path):
    broken, meta, victim, part = corrupt_world
    root = tmp_path / "world"
    shutil.copytree(broken, root)
    src = SourceSpec(root=str(root), thumbnail_sizes=meta["thumbnail_sizes"])
    out = OutputLayout(str(tmp_path / "out"))

    def job(run_id: str, **kw) -> CompleteJob:
        return CompleteJob(source=src, out=out, model=model, run_id=run_id, block_samples=8, **kw)

    first = on_cluster(run_complete, job=job("q1"))
    assert first["quarantined"] == 1
    cube = Cube.open(first["cube"])
    done = cube.done_mask()
    before = {n: np.asarray(cube.group[n][:])[done] for n in ("DEM", "S1RTC", "S2L1C", "S2L2A", "origin")}

    again = on_cluster(run_complete, job=job("q2"))
    assert again["blocks_run"] == 0 and again["quarantined"] == 1  # without the flag: left as it is

    good = Path(tiny_world[0]) / "Core-S2L2A" / "images" / part  # the source is fixed
    shutil.copy(good, root / "Core-S2L2A" / "images" / part)
    fixed = on_cluster(run_complete, job=job("q3", retry_quarantined=True))
    assert fixed["blocks_retried"] >= 1 and fixed["quarantined"] == 0
    assert Ledger(fixed["cube"]).quarantined() == []
    cube = Cube.open(fixed["cube"])
    keys = sample_keys(cube)
    assert len(keys) == len(set(keys)) and cube.done_mask().all() and victim in {k[0] for k in keys}
    for name, old in before.items():  # uint8, same seeds: the samples done before keep their bytes
        assert np.array_equal(np.asarray(cube.group[name][:])[done], old), name
