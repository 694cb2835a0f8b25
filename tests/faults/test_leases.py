"""Finding 6: a lease whose holder ran on this host and is gone (pid absent, or reused by another process,
told by its start time) is taken over at once with a line saying so; a live holder still blocks."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
from copgen.processes import process_start as _process_start
from copgen.storage.ledger import LEASE_NAME, LEDGER_DIR, LeaseHeldError, Ledger


def _plant(cube, pid: int, pid_start: str | None, host: str | None = None) -> None:
    now = time.time()
    lease = {"run_id": "crashed-run", "host": host or socket.gethostname(), "pid": pid, "token": "t",
             "acquired_at": "x", "renewed_at": "x", "expires_at": now + 3600, "ttl_s": 3600,
             "pid_start": pid_start}
    (cube / LEDGER_DIR).mkdir(parents=True, exist_ok=True)
    (cube / LEDGER_DIR / LEASE_NAME).write_text(json.dumps(lease))


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    start = _process_start(gone.pid)
    gone.wait()
    _plant(tmp_path / "c.zarr", gone.pid, start)
    with caplog.at_level(logging.WARNING, logger="copgen.storage.ledger"):
        lease = Ledger(str(tmp_path / "c.zarr")).acquire_lease("next-run", ttl_s=60, heartbeat=False)
    assert lease.info.run_id == "next-run"
    assert "is gone" in caplog.text and "crashed-run" in caplog.text
    lease.release()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    _plant(tmp_path / "c.zarr", os.getpid(), "1")  # our pid, but another process's start time
    lease = Ledger(str(tmp_path / "c.zarr")).acquire_lease("next-run", ttl_s=60, heartbeat=False)
    lease.release()


def test_a_live_holder_or_another_host_still_blocks(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(tmp_path / "a.zarr", live.pid, _process_start(live.pid))
        with pytest.raises(LeaseHeldError, match="crashed-run"):
            Ledger(str(tmp_path / "a.zarr")).acquire_lease("next-run", heartbeat=False)
    finally:
        live.kill()
        live.wait()
    _plant(tmp_path / "b.zarr", 999_999_999, None, host="another-host")
    with pytest.raises(LeaseHeldError):
        Ledger(str(tmp_path / "b.zarr")).acquire_lease("next-run", heartbeat=False)
