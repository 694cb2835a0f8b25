"""The "existing cluster" path: a scheduler and a worker started as separate processes with the ``dask``
command line (as on Kubernetes or SLURM), the flow pointed at the scheduler's address."""

from __future__ import annotations

import processes
import pytest
import xarray as xr
from copgen.flows.clusters import ClusterError, gpu_workers, parse_cluster
from copgen.flows.complete import complete_flow


@pytest.fixture
def dask_cli_cluster(tmp_path):
    with processes.dask_cli_cluster(tmp_path) as address:
        yield address


def test_complete_on_a_scheduler_started_with_the_dask_cli(prefect_api, dask_cli_cluster, tiny_world,
                                                           tiny_model, tmp_path):
    root, meta = tiny_world
    net, vae = tiny_model
    # The worker declares GPU=1, so the flow annotates its block tasks with that resource (CPU here).
    assert gpu_workers(dask_cli_cluster) == 1
    summary = complete_flow(source=root, out=str(tmp_path), weights=net, vae=vae, cluster=dask_cli_cluster,
                            steps=3, solver="2m", batch_size=4, block_samples=8, run_seed=11,
                            thumbnail_sizes=meta["thumbnail_sizes"])
    assert summary["samples_done"] == summary["samples_total"] > 0
    assert xr.open_zarr(tmp_path / "complete.zarr").done.values.all()


@pytest.mark.parametrize("bad", ["local-gpu", "http://host:8786", "", "tcp://"])
def test_cluster_option_errors_name_the_valid_forms(bad):
    with pytest.raises(ClusterError, match="local-cuda"):
        parse_cluster(bad)


def test_cluster_option_forms():
    assert parse_cluster("local", n_workers=3).n_workers == 3
    assert parse_cluster("tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert parse_cluster("local-cuda").has_gpu_workers


def test_local_cluster_workers_keep_tensor_buffers_on_the_heap():
    """Workers we start get WORKER_ENV before they spawn (glibc reads it at process start), next to Dask's
    own malloc setting, which stays, and the cores shared out between them as torch threads."""
    import os

    from copgen.flows.clusters import WORKER_ENV, open_cluster
    from distributed import Client

    def env():
        import torch

        keys = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")
        return {**{k: os.environ.get(k) for k in keys}, "torch_threads": torch.get_num_threads()}

    with open_cluster(parse_cluster("local", n_workers=1)) as (address, _), Client(address) as client:
        (seen,) = client.run(env).values()
    assert seen["MALLOC_MMAP_THRESHOLD_"] == WORKER_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert seen["MALLOC_TRIM_THRESHOLD_"] is not None
    # one worker, one task at a time: it gets every core (Dask's default would be one thread)
    assert seen["OMP_NUM_THREADS"] == str(os.cpu_count()) and seen["torch_threads"] == os.cpu_count()
