"""Finding 4/5: one line and a hint where a traceback used to be, with the documented exit code; the
Prefect start timeout is really what the code says (90 s, configurable)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from copgen.flows.failures import ClusterLostError, StorageUnavailableError, classify
from copgen.storage.majortom.reader import SourceError


def _cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "copgen.flows.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=timeout)


def test_failures_map_to_the_documented_codes():
    from botocore.exceptions import EndpointConnectionError
    from distributed import KilledWorker

    assert classify(SourceError("metadata file not found", dataset="Core-DEM")).exit_code == 2
    assert classify(FileNotFoundError("weights.safetensors")).exit_code == 2
    assert classify(ValueError("bad --bbox")).exit_code == 2
    s3 = classify(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert isinstance(s3, StorageUnavailableError) and s3.exit_code == 4
    wrapped = RuntimeError("task failed")
    wrapped.__cause__ = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert classify(wrapped).exit_code == 4
    lost = classify(KilledWorker("process-block-1", SimpleNamespace(address="tcp://127.0.0.1:1"), 3))
    assert isinstance(lost, ClusterLostError) and lost.exit_code == 4
    assert classify(RuntimeError("a bug")) is None  # not ours: the traceback stays


def test_a_dask_timeout_is_the_cluster_not_the_storage():
    # A builtin TimeoutError says "unreachable" by its type alone; raised inside a Dask client call it means
    # the cluster did not answer (a real scheduler with no workers here), and storage is not to blame.
    from distributed import Client, LocalCluster

    with (LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster,
          Client(cluster) as client, pytest.raises(TimeoutError) as raised):
        client.wait_for_workers(1, timeout=0.5)
    err = classify(raised.value)
    assert isinstance(err, ClusterLostError) and err.exit_code == 4
    assert str(err).startswith("the Dask cluster did not answer: WorkerStartTimeoutError")
    plain = classify(TimeoutError("read timed out"))  # raised by no library: still an unreachable service
    assert isinstance(plain, StorageUnavailableError)


def test_prefect_start_timeout_is_set_before_prefect_reads_it():
    code = ("import copgen.flows.cli\nfrom prefect.settings import "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as T\nprint(T.value())")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[-1] == "90"
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "150"  # the operator's setting wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[-1] == "150"


@pytest.mark.slow
def test_a_prefect_server_that_does_not_start_is_exit_4_in_one_line(tiny_world, tmp_path):
    root, _ = tiny_world
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "1"  # no server answers within 1 s
    res = subprocess.run([sys.executable, "-m", "copgen.flows.cli", "complete", "--source", root, "--out",
                          str(tmp_path / "o"), "--workers", "1"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 4, res.stderr[-2000:]
    assert "did not answer within 1 s" in res.stderr and "Traceback" not in res.stderr
    assert "hint:" in res.stderr


@pytest.mark.slow
def test_metadata_without_a_column_is_exit_2_in_one_line(prefect_api, tiny_model, world_copy, tmp_path):
    """Past the CLI's preflight (the file is a parquet file), the reader's SourceError inside the flow."""
    import pyarrow.parquet as pq

    root, _ = world_copy
    path = f"{root}/Core-DEM/metadata.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["centre_lat"]), path)
    net, vae = tiny_model
    args = ["complete", "--source", root, "--out", str(tmp_path / "o"), "--weights", net, "--vae", vae,
            "--workers", "1"]
    res = _cli(*args, env={"PREFECT_API_URL": prefect_api})
    assert res.returncode == 2, res.stderr[-3000:]
    assert "lacks column(s) ['centre_lat']" in res.stderr and "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("error:")]) == 1
    verbose = _cli(*args, "--verbose", env={"PREFECT_API_URL": prefect_api})
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr  # --verbose shows it
