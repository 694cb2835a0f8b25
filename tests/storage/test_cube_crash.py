"""Crash and resume: a writer killed mid-data or between data and marker; the resumed run writes only
what is missing and the final store is byte-identical to an uninterrupted run.

Compared: every object of the cube and of the provenance table, byte for byte, except
- ``_ledger/lease.json*``: who held the cube and until when (the uninterrupted run released it);
- the run/host/pid/time fields of block markers (``ledger.VOLATILE_MARKER_FIELDS``); the rest of each
  marker (block range, per-array sha256, counts) must match.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import cube_worker  # noqa: E402
from copgen.storage.cubes import Cube, CubeSpec  # noqa: E402
from copgen.storage.ledger import LeaseHeldError, Ledger, strip_volatile  # noqa: E402

SPEC = CubeSpec(tile_size=16, iterations=2, latent_shape=(4, 2, 2), shard_samples=2, block_samples=4)
N_SAMPLES = 14  # blocks of 4, 4, 4, 2
RUN = "run-1"  # a resume continues the same run (same table partition)


def _new_cube(url: str, so: dict | None = None) -> Cube:
    cube = Cube.create(url, SPEC, so)
    cube.grow([f"{i + 1}D_{2 * i + 1}L" for i in range(N_SAMPLES)], [i % 16 for i in range(N_SAMPLES)],
              centre_lat=[float(i) for i in range(N_SAMPLES)],
              centre_lon=[-float(i) for i in range(N_SAMPLES)])
    return cube


def _comparable(cube_url: str, tables_url: str, so: dict | None = None) -> dict[str, bytes]:
    objects = {}
    for key, data in cube_worker.snapshot(cube_url, so).items():
        if key.startswith("_ledger/lease.json"):
            continue
        if key.startswith("_ledger/blocks/"):
            data = json.dumps(strip_volatile(json.loads(data)), sort_keys=True).encode()
        objects[f"cube/{key}"] = data
    objects.update({f"tables/{k}": v for k, v in cube_worker.snapshot(tables_url, so).items()})
    return objects


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """The uninterrupted run: one worker, every block, no crash."""
    root = tmp_path_factory.mktemp("reference")
    cube = _new_cube(str(root / "c.zarr"))
    code, written = cube_worker.finish(cube_worker.spawn(str(root / "c.zarr"), str(root / "prov"), RUN,
                                                         cube.blocks()))
    assert code == 0 and written == [b.id for b in cube.blocks()]
    return _comparable(str(root / "c.zarr"), str(root / "prov"))


def test_crash_between_data_and_marker_and_mid_data(tmp_path, reference):
    url, tables_url = str(tmp_path / "c.zarr"), str(tmp_path / "prov")
    cube = _new_cube(url)
    b = cube.blocks()
    ledger = Ledger(url)
    p1 = cube_worker.spawn(url, tables_url, RUN, b[0:2], crash=f"before_marker:{b[1].id}")
    p2 = cube_worker.spawn(url, tables_url, RUN, b[2:3], crash=f"mid_data:{b[2].id}")
    assert cube_worker.finish(p1) == (cube_worker.CRASH_EXIT, [b[0].id])
    assert cube_worker.finish(p2) == (cube_worker.CRASH_EXIT, [])
    done = cube.done_mask()
    assert done[b[1].start:b[1].stop].any()  # block 1's data and done flags are there, its marker is not
    assert not done[b[2].start:b[2].stop].any()  # block 2 died inside its data

    # the driver "dies" with its workers (its lease is never released nor renewed); a resumed driver is
    # refused while that lease lives, then takes it over
    driver = ledger.acquire_lease(RUN, ttl_s=2.0, heartbeat=False)
    with pytest.raises(LeaseHeldError, match=RUN):
        Ledger(url).acquire_lease("run-1-resume")
    time.sleep(max(0.0, driver.info.expires_at - time.time()) + 0.05)
    with Ledger(url).acquire_lease(RUN, ttl_s=30):
        pending = Ledger(url).pending_blocks(Cube.open(url))
        assert pending == [b[1], b[2], b[3]]
        untouched = {p: p.stat().st_mtime_ns for p in Path(url).rglob("*") if p.is_file()
                     and "_ledger" not in p.parts and _block_of(p, url) == 0}
        assert untouched  # block 0's shards and flags
        code, written = cube_worker.finish(cube_worker.spawn(url, tables_url, RUN, pending))
        assert code == 0 and written == [blk.id for blk in pending]
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # finished work was not redone
    assert Ledger(url).pending_blocks(Cube.open(url)) == []
    got = _comparable(url, tables_url)
    assert sorted(got) == sorted(reference)
    assert [k for k in reference if got[k] != reference[k]] == []


def _block_of(path: Path, url: str) -> int | None:
    """Block index of a chunk/shard object (sample chunk index // shards per block), else None. Arrays
    written by blocks name objects ``<array>/c.<sample>.<...>``."""
    rel = path.relative_to(url).parts
    coords = ("grid_cell", "patch", "centre_lat", "centre_lon")
    if len(rel) != 2 or not rel[1].startswith("c.") or rel[0] in coords:
        return None
    return int(rel[1].split(".")[1]) * SPEC.shard_samples // SPEC.block_samples


def test_sigkill_during_s3_writes_then_resume(s3_server, reference):
    so = s3_server.storage_options
    bucket = s3_server.new_bucket()
    url, tables_url = f"s3://{bucket}/c.zarr", f"s3://{bucket}/prov"
    cube = _new_cube(url, so)
    proc = cube_worker.spawn(url, tables_url, RUN, cube.blocks(), so, pause=0.3)
    ledger = Ledger(url, so)
    deadline = time.time() + 60
    while not ledger.done_block_ids() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the pause or in the next block's writes: any point must be safe
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    pending = ledger.pending_blocks(Cube.open(url, so))
    assert 0 < len(pending) < len(cube.blocks())
    code, written = cube_worker.finish(cube_worker.spawn(url, tables_url, RUN, pending, so))
    assert code == 0 and written == [b.id for b in pending]
    assert ledger.pending_blocks(Cube.open(url, so)) == []
    got = _comparable(url, tables_url, so)  # the S3 store must equal the local reference, byte for byte
    assert sorted(got) == sorted(reference)
    assert [k for k in reference if got[k] != reference[k]] == []
