"""Ledger: block markers, resume lists, quarantine, and the writer lease (local disk and real S3)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import cube_worker  # noqa: E402
from copgen.storage.cubes import Cube, CubeSpec, WorkBlock  # noqa: E402
from copgen.storage.ledger import (  # noqa: E402
    LeaseHeldError,
    LeaseLostError,
    Ledger,
    QuarantineRecord,
    strip_volatile,
    summarise_exception,
)
from copgen.storage.objects import ConditionalStore, StorageIdError, check_id  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SPEC = CubeSpec(tile_size=8, iterations=1, shard_samples=1, block_samples=3)


@pytest.fixture(params=["local", "s3"])
def cube_url(request, tmp_path):
    """A cube URL and its storage options, on local disk and on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "c.zarr"), {}
    s3 = request.getfixturevalue("s3_server")
    return f"s3://{s3.new_bucket()}/c.zarr", s3.storage_options


def _write(cube: Cube, ledger: Ledger, block: WorkBlock, run_id: str = "run-a") -> None:
    data = cube_worker.synth_block(cube, block)
    digests = cube.write_block(block, data)
    ledger.mark_done(block, run_id, digests, n_done=int(data.done.sum()))


def test_markers_and_what_is_left(cube_url):
    url, so = cube_url
    cube = Cube.create(url, SPEC, so)
    blocks = cube.grow([f"{i}U_1R" for i in range(10)], ["center"] * 10)  # blocks of 3,3,3,1
    ledger = Ledger(url, so)
    assert ledger.pending_blocks(cube) == blocks
    _write(cube, ledger, blocks[0])
    _write(cube, ledger, blocks[2])
    assert ledger.done_block_ids() == {blocks[0].id, blocks[2].id}
    assert ledger.pending_blocks(cube) == [blocks[1], blocks[3]]
    marker = ledger.marker(blocks[2])
    assert marker["arrays"] == cube.block_digest(blocks[2])  # the marker describes the stored bytes
    assert marker["n_done"] == int(cube.done_mask()[6:9].sum())
    assert set(strip_volatile(marker)) >= {"block", "start", "stop", "arrays", "n_done"}
    assert "run_id" not in strip_volatile(marker)
    # samples not done: the unwritten blocks' samples (3..5, 9); blocks 0 and 2 were all done
    # integer indices
    np.testing.assert_array_equal(ledger.pending_samples(cube, include_quarantined=True), [3, 4, 5, 9])

    # a marker that lies about ``done`` (data lost after the marker) puts the block back on the list
    ledger.store.put(f"blocks/{blocks[0].id}.json",
                     json.dumps({**marker, "block": blocks[0].id, "n_done": 0}).encode())
    assert ledger.pending_blocks(cube) == [blocks[0], blocks[1], blocks[3]]
    # an unreadable (torn, foreign) marker means: redo
    ledger.store.put(f"blocks/{blocks[2].id}.json", b"{not json")
    assert ledger.marker(blocks[2]) is None
    assert blocks[2] in ledger.pending_blocks(cube)


def test_quarantine_records(cube_url):
    url, so = cube_url
    cube = Cube.create(url, SPEC, so)
    cube.grow(["1U_1R", "2U_2R", "3U_3R"], [0, 1, "center"])
    ledger = Ledger(url, so)
    try:
        raise ValueError("PNG header broken at byte 0")
    except ValueError as e:
        tb = summarise_exception(e)
    rec = QuarantineRecord(grid_cell="2U_2R", patch="1", modality="S1RTC", file="s3://x/S1RTC/part_3.parquet",
                           reason="undecodable thumbnail", traceback=tb, run_id="run-a",
                           block_id="0000000000-0000000003")
    ledger.quarantine(rec)
    ledger.quarantine(rec)  # idempotent: same input, one record
    got = ledger.quarantined()
    assert got == [rec]
    assert "ValueError: PNG header broken at byte 0" in got[0].traceback
    # nothing done yet: all 3 pending, but the quarantined (cell, patch) is not offered again
    np.testing.assert_array_equal(ledger.pending_samples(cube), [0, 2])  # integer indices
    np.testing.assert_array_equal(ledger.pending_samples(cube, include_quarantined=True), [0, 1, 2])


def test_lease_refuses_a_second_run_and_takes_over_an_expired_one(cube_url):
    url, so = cube_url
    Cube.create(url, SPEC, so)
    ledger = Ledger(url, so)
    first = ledger.acquire_lease("run-a", ttl_s=30, heartbeat=False)
    with pytest.raises(LeaseHeldError) as err:
        Ledger(url, so).acquire_lease("run-b", ttl_s=30)
    msg = str(err.value)
    for part in ("run-a", first.info.host, f"pid {first.info.pid}", first.info.acquired_at, "expires"):
        assert part in msg
    assert err.value.holder.run_id == "run-a"
    first.release()
    assert ledger.lease_holder() is None
    with ledger.acquire_lease("run-b", ttl_s=30, heartbeat=False) as second:
        assert ledger.lease_holder().token == second.info.token
    assert ledger.lease_holder() is None

    # a crashed holder stops renewing: after ttl the next run takes over, the old holder is told
    stale = ledger.acquire_lease("run-c", ttl_s=0.5, heartbeat=False)
    time.sleep(0.6)
    fresh = Ledger(url, so).acquire_lease("run-d", ttl_s=30, heartbeat=False)
    assert ledger.lease_holder().run_id == "run-d"
    with pytest.raises(LeaseLostError, match="run-c"):
        stale.renew()
    with pytest.raises(LeaseLostError):
        stale.check()
    stale.release()  # must not delete the new holder's lease
    assert ledger.lease_holder().run_id == "run-d"
    fresh.release()


def test_heartbeat_keeps_a_lease_alive(tmp_path):
    url = str(tmp_path / "c.zarr")
    ledger = Ledger(url)
    with ledger.acquire_lease("run-a", ttl_s=0.6) as lease:
        time.sleep(1.3)  # > 2 ttl: only the heartbeat keeps it
        lease.check()
        with pytest.raises(LeaseHeldError, match="run-a"):
            ledger.acquire_lease("run-b", ttl_s=5)


def test_second_process_is_refused_with_the_holder_named(tmp_path):
    url = str(tmp_path / "c.zarr")
    with Ledger(url).acquire_lease("driver-1", ttl_s=60) as lease:
        code = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(REPO)!r})
            from copgen.storage.ledger import Ledger, LeaseHeldError
            try:
                Ledger({url!r}).acquire_lease("driver-2")
            except LeaseHeldError as e:
                print("REFUSED", e.holder.run_id, e.holder.pid); sys.exit(3)
        """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert proc.stdout.split() == ["REFUSED", "driver-1", str(lease.info.pid)]


def test_exactly_one_of_racing_creators_wins(tmp_path):
    store = ConditionalStore(str(tmp_path / "ledger"))
    wins = []

    def create(i: int) -> None:
        if store.create("lease.json", f"holder {i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    data, tag = store.read("lease.json")
    assert data == f"holder {wins[0]}".encode()
    assert not store.replace("lease.json", b"x", "stale-tag")
    assert store.replace("lease.json", b"y", tag)
    assert not store.delete("lease.json", tag)  # tag changed with the replace
    assert store.delete("lease.json", store.read("lease.json")[1])


@pytest.mark.parametrize("bad", ["", "../up", "a/b", ".hidden", "x" * 129, "run id", "a..b", None])
def test_identifiers_that_become_paths_are_validated(bad, tmp_path):
    with pytest.raises(StorageIdError, match="invalid run id"):
        check_id(bad, "run id")
    with pytest.raises(StorageIdError):
        Ledger(str(tmp_path / "c.zarr")).acquire_lease(bad)
    with pytest.raises(ValueError, match="invalid block id"):
        WorkBlock.parse("0000000001-0000000001")
    with pytest.raises(ValueError, match="invalid block id"):
        WorkBlock.parse("../0000000000-0000000001")
