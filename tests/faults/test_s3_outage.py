"""Finding 7: an S3 source that goes away mid-run ends in one line, exit 4, with nothing quarantined or lost
(an outage is not a corrupt input); once the endpoint is back, the same command completes the run.
A real moto S3 server in its own process on loopback, killed with SIGKILL while the blocks read from it."""

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

import pytest
from copgen.storage.cubes import Cube
from copgen.storage.ledger import Ledger

from .conftest import sample_keys

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.skip("moto server did not start")


def _upload(port: int, root: str) -> str:
    import boto3
    import s3fs

    endpoint = {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}
    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **endpoint).create_bucket(Bucket="world-bucket")
    fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True, client_kwargs=endpoint)
    fs.put(root, "world-bucket/world", recursive=True)
    return "s3://world-bucket/world"


def test_a_source_outage_is_exit_4_and_the_rerun_completes(prefect_api, tiny_world, tiny_model, tmp_path):
    root, _ = tiny_world
    net, vae = tiny_model
    port = _free_port()
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "COLUMNS": "200"}
    moto = _start_moto(port)
    try:
        src = _upload(port, root)
        out = tmp_path / "out"
        args = [sys.executable, "-m", "copgen.flows.cli", "complete", "--source", src, "--out", str(out),
                "--storage-option", f"endpoint_url=http://127.0.0.1:{port}", "--weights", net, "--vae", vae,
                "--workers", "1", "--steps", "3", "--solver", "2m", "--block-samples", "1", "--json"]
        run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lease = out / "complete.zarr" / "_ledger" / "lease.json"
        end = time.monotonic() + 400
        while not lease.exists() and run.poll() is None and time.monotonic() < end:
            time.sleep(0.2)
        moto.send_signal(signal.SIGKILL)  # the endpoint is gone while the blocks read their inputs
        moto.wait()
        _, err = run.communicate(timeout=400)
        assert run.returncode == 4, err[-3000:]
        assert "storage unreachable" in err and "Traceback" not in err and "hint:" in err
        ledger = Ledger(str(out / "complete.zarr"))
        assert ledger.quarantined() == []  # an outage never quarantines an input

        moto = _start_moto(port)  # the endpoint is back (moto keeps no data: the source is restored)
        _upload(port, root)
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout[done.stdout.index("{"):])
        cube = Cube.open(str(out / "complete.zarr"))
        keys = sample_keys(cube)
        assert len(keys) == len(set(keys)) and cube.done_mask().all() and summary["quarantined"] == 0
        assert ledger.pending_blocks(cube) == []
        import pandas as pd

        prov = pd.read_parquet(out / "tables" / "provenance")
        assert not prov.duplicated(["sample", "iteration", "modality"]).any()
        assert len(prov) == cube.n_samples * cube.spec.iterations * len(cube.spec.modalities)
    finally:
        if moto.poll() is None:
            moto.kill()
            moto.wait()
    assert not list(Path(out).rglob("*.tmp"))
