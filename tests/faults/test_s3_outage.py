"""Finding 7: S3 stalls and outages, from outside, with `copgen complete` against a real moto S3 server in its
own process on loopback (paused with SIGSTOP, killed with SIGKILL) while the blocks read and write.

- a stall shorter than the retry window: visible "waiting for s3://..." lines, then the run completes,
  identical to an uninterrupted run;
- a stall longer than the retry window, with the cube on S3: the visible attempts n/8, exit 4 in one line,
  no marker claims data that is not stored, and the rerun completes identical;
- the endpoint killed (connection refused): the same, and the rerun after the restart completes.

One moto process and one uploaded world for the module; the policy's waits and timeouts are shortened
through its environment variables (storage/retry.py) so each failure takes seconds, not minutes.
Comparisons are exact: tiles, origin codes and done flags are uint8 (the decoder's output quantised; same
inputs, seeds and code give the same bytes), keys are strings; latents (float16) are not compared."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import numpy as np
import pytest
from copgen.storage.cubes import Cube
from copgen.storage.ledger import Ledger

from .conftest import sample_keys

pytestmark = pytest.mark.slow

UINT8_ARRAYS = ("DEM", "S1RTC", "S2L1C", "S2L2A", "origin", "done")
# Short waits so an outage is given up within ~10 s; a read timeout of 3 s, long enough for a busy moto.
FAST_POLICY = {"COPGEN_STORAGE_BACKOFF": "0.1", "COPGEN_STORAGE_BACKOFF_MAX": "0.5",
               "COPGEN_STORAGE_TIMEOUT": "3"}


class MotoProcess:
    """A moto S3 server process on 127.0.0.1 holding the uploaded world (restartable: moto keeps no data)."""

    def __init__(self, world_root: str) -> None:
        self.world_root = world_root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.3)
        else:
            self.stop()
            pytest.skip("moto server did not start")
        client = self.client()
        for bucket in ("world-bucket", "out-bucket"):
            client.create_bucket(Bucket=bucket)
        self.fs().put(self.world_root, "world-bucket/world", recursive=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_up(self) -> None:
        if not self.alive():
            self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def client(self):
        import boto3

        return boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                            endpoint_url=self.endpoint, region_name="us-east-1")

    @property
    def storage_options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
                "skip_instance_cache": True}

    def fs(self):
        import copgen.storage  # noqa: F401 - s3:// is the retrying filesystem
        import fsspec

        return fsspec.filesystem("s3", key="testing", secret="testing", **self.storage_options)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket="out-bucket", Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def moto(tiny_world):
    server = MotoProcess(tiny_world[0])
    server.start()
    yield server
    server.stop()


def _env(prefect_api: str, **policy: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_api, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "COLUMNS": "200", **policy}


def _args(moto: MotoProcess, out: str, tiny_model) -> list[str]:
    net, vae = tiny_model
    return [sys.executable, "-m", "copgen.flows.cli", "complete", "--source", "s3://world-bucket/world",
            "--out", out, "--storage-option", f"endpoint_url={moto.endpoint}", "--weights", net, "--vae", vae,
            "--workers", "1", "--steps", "3", "--solver", "2m", "--block-samples", "1", "--json"]


def _arrays(cube: Cube) -> dict[str, np.ndarray]:
    return {name: np.asarray(cube.group[name][:]) for name in UINT8_ARRAYS}


def _assert_complete_and_identical(cube: Cube, reference: dict, tables: Path) -> None:
    """Every sample done once, the uint8 arrays equal to the uninterrupted run's (exact: see the module
    doc), each (sample, iteration, modality) exactly once in the provenance table (counted with duckdb)."""
    keys = sample_keys(cube)
    assert keys == reference["keys"] and len(set(keys)) == len(keys)
    assert cube.done_mask().all()
    got = _arrays(cube)
    for name, expected in reference["arrays"].items():
        assert np.array_equal(got[name], expected), name
    rows, distinct = duckdb.connect().execute(
        f"SELECT count(*), count(DISTINCT (sample, iteration, modality)) FROM "
        f"read_parquet('{tables}/provenance/**/*.parquet', hive_partitioning=true)").fetchone()
    assert rows == distinct == cube.n_samples * cube.spec.iterations * len(cube.spec.modalities)


def _s3_cube(moto: MotoProcess, prefix: str, tmp_path: Path) -> tuple[Cube, Path]:
    """The cube on S3, and its tables copied down (duckdb reads them locally: no httpfs here)."""
    so = {"key": "testing", "secret": "testing", **moto.storage_options}
    cube = Cube.open(f"s3://out-bucket/{prefix}/complete.zarr", storage_options=so)
    local = tmp_path / f"{prefix}-tables"
    moto.fs().get(f"out-bucket/{prefix}/tables", str(local), recursive=True)
    return cube, local


def _wait_for_first_marker(moto: MotoProcess, prefix: str, run: subprocess.Popen) -> None:
    """Until a block's marker is on S3: the run is mid-way, its blocks reading and writing."""
    end = time.monotonic() + 400
    while not moto.keys(f"{prefix}/complete.zarr/_ledger/blocks/") and run.poll() is None:
        assert time.monotonic() < end, "no block finished"
        time.sleep(0.3)
    assert run.poll() is None, "the run ended before the fault could be injected"


def _waits(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("waiting for s3://")]


@pytest.fixture(scope="module")
def reference(moto, prefect_api, tiny_model, tmp_path_factory):
    """The uninterrupted run (S3 source, local cube)."""
    out = tmp_path_factory.mktemp("s3-reference") / "out"
    done = subprocess.run(_args(moto, str(out), tiny_model), capture_output=True, text=True,
                          env=_env(prefect_api, **FAST_POLICY), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cube = Cube.open(str(out / "complete.zarr"))
    return {"keys": sample_keys(cube), "arrays": _arrays(cube)}


def test_a_stall_shorter_than_the_retries_is_waited_out(moto, reference, prefect_api, tiny_model, tmp_path):
    """SIGSTOP for 10 s (> the 3 s read timeout, < the ~25 s retry window) while blocks read the source and
    write the cube on S3: the waits are shown, then the run completes, identical to the uninterrupted run."""
    moto.ensure_up()
    prefix = "stall"
    run = subprocess.Popen(_args(moto, f"s3://out-bucket/{prefix}", tiny_model), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=_env(prefect_api, **FAST_POLICY))
    try:
        _wait_for_first_marker(moto, prefix, run)
        moto.proc.send_signal(signal.SIGSTOP)
        time.sleep(10)
    finally:
        moto.proc.send_signal(signal.SIGCONT)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    waits = _waits(err)
    assert waits and all("s3://" in w and "testing" not in w for w in waits), err[-3000:]
    cube, tables = _s3_cube(moto, prefix, tmp_path)
    _assert_complete_and_identical(cube, reference, tables)
    assert not [k for k in moto.keys(prefix) if k.endswith(".tmp")]


def test_a_stall_longer_than_the_retries_is_exit_4_and_nothing_is_marked_early(
        moto, reference, prefect_api, tiny_model, tmp_path):
    """The cube on S3, the endpoint paused until the run gives up: attempts 1/8 .. 7/8 shown, exit 4 in one
    line; every block marker written matches the data stored (markers come after the data); the rerun, with
    the endpoint back, completes identical."""
    moto.ensure_up()
    prefix = "outage"
    env = _env(prefect_api, **{**FAST_POLICY, "COPGEN_STORAGE_TIMEOUT": "1"})
    args = _args(moto, f"s3://out-bucket/{prefix}", tiny_model)
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_first_marker(moto, prefix, run)
        moto.proc.send_signal(signal.SIGSTOP)
        _, err = run.communicate(timeout=600)
    finally:
        moto.proc.send_signal(signal.SIGCONT)
    assert run.returncode == 4, err[-3000:]
    assert "Traceback" not in err and "hint:" in err and "gave up after 8 attempt(s)" in err, err[-3000:]
    waits = _waits(err)
    assert any("(attempt 1/8)" in w for w in waits) and any("(attempt 7/8)" in w for w in waits), err[-3000:]

    so = {"key": "testing", "secret": "testing", **moto.storage_options}
    url = f"s3://out-bucket/{prefix}/complete.zarr"
    cube, ledger = Cube.open(url, storage_options=so), Ledger(url, so)
    marked = [b for b in cube.blocks() if b.id in ledger.done_block_ids()]
    assert marked, "no block was finished before the outage"
    for block in marked:  # a marker is written only after its block's data: the stored bytes are the marker's
        assert cube.block_digest(block) == ledger.marker(block)["arrays"], block.id
    assert ledger.quarantined() == []  # an outage never quarantines an input

    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cube, tables = _s3_cube(moto, prefix, tmp_path)
    _assert_complete_and_identical(cube, reference, tables)
    assert not [k for k in moto.keys(prefix) if k.endswith(".tmp")]


def test_a_source_outage_is_exit_4_and_the_rerun_completes(moto, reference, prefect_api, tiny_model,
                                                           tmp_path):
    """The endpoint killed (connection refused) while the blocks read their inputs (local cube): exit 4
    after the visible attempts, nothing quarantined; once the endpoint is back the same command completes."""
    moto.ensure_up()
    out = tmp_path / "out"
    args = _args(moto, str(out), tiny_model)
    env = _env(prefect_api, **FAST_POLICY)
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lease = out / "complete.zarr" / "_ledger" / "lease.json"  # taken before any block reads its inputs
    end = time.monotonic() + 400
    while not lease.exists() and run.poll() is None:
        assert time.monotonic() < end, "the run never took its lease"
        time.sleep(0.2)
    moto.proc.send_signal(signal.SIGKILL)  # the endpoint is gone while the blocks read their inputs
    moto.proc.wait()
    _, err = run.communicate(timeout=600)
    assert run.returncode == 4, err[-3000:]
    assert "storage unreachable" in err and "Traceback" not in err and "hint:" in err
    assert "gave up after 8 attempt(s)" in err and "connection refused" in err, err[-3000:]
    assert any("(attempt 7/8)" in w for w in _waits(err)), err[-3000:]
    ledger = Ledger(str(out / "complete.zarr"))
    assert ledger.quarantined() == []  # an outage never quarantines an input

    moto.start()  # the endpoint is back (moto keeps no data: the source is uploaded again)
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["quarantined"] == 0
    cube = Cube.open(str(out / "complete.zarr"))
    assert ledger.pending_blocks(cube) == []
    _assert_complete_and_identical(cube, reference, out / "tables")
    assert not list(Path(out).rglob("*.tmp"))
