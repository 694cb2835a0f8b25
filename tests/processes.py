"""Helpers for tests that run the operator's tools as separate processes: free loopback ports, waiting
for a condition with a readable timeout, stopping a process politely, and a Dask scheduler + worker
started from the `dask` command line (as on Kubernetes or SLURM). Imported as `processes`
(pyproject's pytest `pythonpath`)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not gone within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(check: Callable[[], object], timeout: float, what: str, logs: Path | None = None):
    """Poll `check` until it returns something truthy (returned); fail naming `what`, with a log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    tail = logs.read_text()[-4000:] if logs is not None and logs.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


@contextlib.contextmanager
def dask_cli_cluster(folder: Path, env: dict | None = None, console_scripts: bool = False) -> Iterator[str]:
    """A scheduler and one worker (1 thread, resource GPU=1) as separate processes; yields the address.
    `console_scripts` runs the installed `dask` command (the operator's form) instead of the modules."""
    if console_scripts:
        dask = str(Path(sys.executable).parent / "dask")
        sched_cmd, worker_cmd = [dask, "scheduler"], [dask, "worker"]
    else:
        sched_cmd = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
        worker_cmd = [sys.executable, "-m", "distributed.cli.dask_worker"]
    sched_file = folder / "scheduler.json"
    scheduler = subprocess.Popen([*sched_cmd, "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                                  ":0", "--scheduler-file", str(sched_file)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        wait_for(lambda: sched_file.exists() and sched_file.stat().st_size, 60, "the dask scheduler file")
        address = json.loads(sched_file.read_text())["address"]
        worker_env = {**(env if env is not None else os.environ),
                      "MALLOC_MMAP_THRESHOLD_": "33554432"}
        worker = subprocess.Popen([*worker_cmd, address, "--nworkers", "1", "--nthreads", "1",
                                   "--resources", "GPU=1", "--no-dashboard"],
                                  env=worker_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        yield address
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                stop(proc, timeout=20)
