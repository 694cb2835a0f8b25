"""Finding 6 (second half): the driver's Prefect server and Dask cluster shut down on every exit path,
SIGTERM included (a killed driver used to leave its Prefect server running), and the lease is released so
the next run starts at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(predicate, limit_s: float) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see the run's processes")
def test_sigterm_shuts_down_the_server_cluster_and_lease(tiny_world, tiny_model, tmp_path):
    root, _ = tiny_world
    net, vae = tiny_model
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the run starts its own server
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.Popen([sys.executable, "-m", "copgen.flows.cli", "complete", "--source", root, "--out",
                             str(out), "--weights", net, "--vae", vae, "--workers", "1", "--steps", "50",
                             "--block-samples", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lease = out / "complete.zarr" / "_ledger" / "lease.json"
    try:
        assert _wait_for(lambda: lease.exists() or proc.poll() is not None, 400), "the run never started"
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        helpers = _descendants(proc.pid)  # the Prefect server, the nanny and its worker
        assert len(helpers) >= 2
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "terminated" in err and "Traceback" not in err
    assert not lease.exists()  # released: the next run need not wait for the expiry
    assert _wait_for(lambda: not any(_alive(p) for p in helpers), 60), \
        f"left running: {[p for p in helpers if _alive(p)]}"
