"""A schedule end to end, as an operator runs it: a real Prefect server (`prefect server start`, SQLite in
a temp folder), `copgen deploy` registering deployments for a process work pool, a real
`prefect worker start --type process` picking up runs created now (as the scheduler creates them), once on
a local Dask cluster and once on a scheduler and worker started with the `dask` command line. The second
run, after cells were added to the source, adds only the new cells; a run of the same flow served by
`copgen deploy --serve` then has nothing to do. `prefect deploy --all` of
infra/prefect.yaml registers on the same server with a module-path entrypoint and no pull step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import processes
import pytest
import xarray as xr
from processes import free_port, stop, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "copgen-pool"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on a free loopback port; yields (api_url, env for client processes)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env = {**base, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                 str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        import httpx

        def healthy():
            if proc.poll() is not None:
                raise AssertionError(f"prefect server exited: {log.read_text()[-3000:]}")
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 120, "the Prefect server", log)
        yield url, {**env, "PREFECT_API_URL": url, "PREFECT_LOGGING_LEVEL": "INFO"}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def worker(server, tmp_path_factory):
    """A process worker of the pool, polling every second. The pool is created by `copgen deploy`, so the
    worker starts after the first deployment (see `deployed`)."""
    url, env = server
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    procs = []

    def start():
        with log.open("w") as out:
            procs.append(subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
                env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"},
                stdout=out, stderr=subprocess.STDOUT))
        return log

    yield start
    for proc in procs:
        stop(proc)


@pytest.fixture(scope="module")
def dask_cli(server, tmp_path_factory):
    """A scheduler and a worker started with the installed `dask` command, as an operator does."""
    with processes.dask_cli_cluster(tmp_path_factory.mktemp("dask"), env=server[1],
                                    console_scripts=True) as address:
        yield address


def _copgen(env, *args, check=True):
    result = subprocess.run([str(BIN / "copgen"), *args], env=env, capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _deploy_args(name, world, out, model, cluster):
    net, vae = model
    return ["deploy", "--source", str(world), "--out", str(out), "--weights", net, "--vae", vae,
            "--cluster", cluster, "--workers", "1", "--steps", "2", "--solver", "2m", "--batch-size", "4",
            "--block-samples", "4", "--name", name, "--cron", "0 3 * * *"]


def _deploy(env, name, world, out, model, cluster):
    return _copgen(env, *_deploy_args(name, world, out, model, cluster), "--pool", POOL)


def _run_now(url: str, deployment: str, logs: Path, wait_for_deployment: bool = False):
    """Create a run of the deployment for now (what the server's scheduler does at the cron time) and wait
    until the worker has finished it; returns its artifacts by key."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        if wait_for_deployment:
            def registered():
                with get_client(sync_client=True) as client:
                    try:
                        return client.read_deployment_by_name(f"complete/{deployment}")
                    except ObjectNotFound:
                        return None

            wait_for(registered, 180, f"deployment {deployment}", logs)
        run = run_deployment(f"complete/{deployment}", timeout=0)
        with get_client(sync_client=True) as client:
            def final():
                state = client.read_flow_run(run.id).state
                return state if state is not None and state.is_final() else None

            state = wait_for(final, 420, f"flow run {run.id} of {deployment}", logs)
            assert state.is_completed(), f"{state.type}: {state.message}\n{logs.read_text()[-4000:]}"
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    return {a.key: a for a in artifacts}


def _cube(out: Path):
    """(cells of the cube's samples, their done flags, the dataset), without the padding slots a later
    batch may leave before its shard boundary (no cell, never done)."""
    ds = xr.open_zarr(out / "complete.zarr")
    cells = np.array([str(c) for c in ds.grid_cell.values])
    real = cells != ""
    return list(cells[real]), ds.done.values[real], ds


def test_scheduled_runs_complete_a_world_then_add_only_new_cells(server, worker, dask_cli, tiny_model,
                                                                 tmp_path):
    url, env = server
    world, out = tmp_path / "world", tmp_path / "completed"
    small = ["--seed", "3", "--thumbnail-size", "192", "--missing", "S1RTC=0.5,DEM=0.4", "--cols", "2"]
    _copgen(env, "world", str(world), "--rows", "2", *small)
    cells_before = set(json.loads((world / "world.json").read_text())["cells"])

    # the pool does not exist yet: `copgen deploy` creates it; the worker starts after it
    first = _deploy(env, "nightly-local", world, out, tiny_model, "local")
    assert "copgen.flows.complete.complete_flow" in first.stderr and "Traceback" not in first.stderr
    _deploy(env, "nightly-tcp", world, out, tiny_model, dask_cli)
    logs = worker()

    # run 1, on a local Dask cluster the flow starts
    arts = _run_now(url, "nightly-local", logs)
    cells1, done1, ds1 = _cube(out)
    assert len(cells1) > 0 and done1.all() and set(cells1) <= cells_before
    assert f"| samples done | {len(cells1)} of {len(cells1)} |" in arts["complete-summary"].data
    assert "| quarantined | 0 |" in arts["complete-summary"].data
    assert json.loads(arts["complete-quarantine"].data) == []
    assert arts["complete-cube"].data.endswith("complete.zarr)")  # a markdown link to the cube
    n1 = ds1.sizes["sample"]  # run 1's slots; a later batch starts after them
    before = {v: ds1[v].values.copy() for v in ("origin", "done")}

    # cells appear in the source (a new row of the grid), then run 2 on the `dask` CLI cluster
    _copgen(env, "world", str(world), "--rows", "3", *small, "--overwrite")
    new_cells = set(json.loads((world / "world.json").read_text())["cells"]) - cells_before
    assert new_cells
    arts = _run_now(url, "nightly-tcp", logs)
    cells2, done2, ds2 = _cube(out)
    added = cells2[len(cells1):]
    assert cells2[:len(cells1)] == cells1 and added and set(added) <= new_cells
    assert done2.all()
    assert f"| samples processed this run | {len(added)} |" in arts["complete-summary"].data
    # the first run's samples were not rewritten: integer origin codes and flags, compared exactly
    for v, old in before.items():
        np.testing.assert_array_equal(ds2[v].values[:n1], old)

    # `copgen deploy --serve`: the same flow served in-process; a run with nothing new does nothing
    serve_log = tmp_path / "serve.log"
    with serve_log.open("w") as log:
        serving = subprocess.Popen(
            [str(BIN / "copgen"), *_deploy_args("served", world, out, tiny_model, dask_cli), "--serve"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        arts = _run_now(url, "served", serve_log, wait_for_deployment=True)
    finally:
        stop(serving)
    assert "| samples processed this run | 0 |" in arts["complete-summary"].data
    assert _cube(out)[0] == cells2
    assert "Traceback" not in serve_log.read_text(), serve_log.read_text()[-4000:]


def test_prefect_yaml_deploys_with_the_installed_package(server, tmp_path):
    """`prefect deploy --all` of infra/prefect.yaml (the pool exists, made by `copgen deploy` above or here):
    the stored deployment loads the flow by module path and has no pull step into this checkout."""
    url, env = server
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        from copgen.flows.deploy import ensure_work_pool

        ensure_work_pool(POOL)
    result = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file",
                             "infra/prefect.yaml"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("complete/nightly-complete")
    assert dep.entrypoint == "copgen.flows.complete.complete_flow"
    assert not dep.pull_steps and dep.work_pool_name == POOL
