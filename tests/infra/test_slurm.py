"""SLURM the way HPC users run Dask, against a real single-node Slurm (tests/infra/local_slurm.py):
the batch script infra/slurm/copgen-complete.sbatch submitted with `sbatch`, and dask-jobqueue's
SLURMCluster behind `copgen complete --cluster slurm:<spec>`. Each completes a small synthetic world."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FAST = ["--steps", "2", "--solver", "2m", "--batch-size", "4", "--block-samples", "4"]


def _env(slurm_env, home: Path):
    # the venv first on PATH (as a user's activated environment); each run starts its own temporary
    # Prefect API, its database in a home of its own (not the user's ~/.prefect)
    env = {k: v for k, v in slurm_env.items() if not k.startswith("PREFECT_")}
    # (its startup competes with the job's Dask processes for the cores: a generous timeout)
    return {**env, "PATH": f"{BIN}:{env.get('PATH', '')}", "PREFECT_HOME": str(home),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-world") / "world"
    subprocess.run([str(BIN / "copgen"), "world", str(root), "--rows", "2", "--cols", "2", "--seed", "4",
                    "--missing", "S1RTC=0.5,DEM=0.5"], check=True, capture_output=True, timeout=300)
    return root


def _assert_completed(out: Path):
    ds = xr.open_zarr(out / "complete.zarr")
    assert ds.sizes["sample"] > 0 and ds.done.values.all()


def test_batch_script_completes_a_world(slurm, world, tmp_path):
    """sbatch's command-line options override the script's 2-node GPU lines: one node, one CPU task."""
    out = tmp_path / "completed"
    env = {**_env(slurm, tmp_path / "prefect"), "SOURCE": str(world), "OUT": str(out), "WEIGHTS": "bundled",
           "VAE": "bundled", "WORKER_RESOURCES": "", "COPGEN_ARGS": " ".join(FAST)}
    log = tmp_path / "job.out"
    result = subprocess.run(
        ["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none",
         "--time=15", f"--chdir={tmp_path}", f"--output={log}",
         str(REPO / "infra/slurm/copgen-complete.sbatch")],
        env=env, capture_output=True, text=True, timeout=900)
    text = log.read_text() if log.exists() else ""
    assert result.returncode == 0, result.stdout + result.stderr + text[-4000:]
    _assert_completed(out)
    assert not list(tmp_path.glob("copgen-scheduler-*.json"))  # the scheduler file is cleaned up


def test_jobqueue_cluster_completes_a_world(slurm, world, tmp_path):
    """The driver here (a login node), SLURMCluster submitting one worker job to the local Slurm."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "jobs": 1, "cores": 1, "memory": "3GB", "walltime": "00:15:00", "python": sys.executable,
        "log_directory": str(tmp_path / "logs"), "local_directory": str(tmp_path / "dask"),
        "scheduler_options": {"host": "127.0.0.1"},
    }))
    out = tmp_path / "completed"
    result = subprocess.run(
        [str(BIN / "copgen"), "complete", "--source", str(world), "--out", str(out), "--weights", "bundled",
         "--vae", "bundled", "--cluster", f"slurm:{spec}", *FAST], env=_env(slurm, tmp_path / "prefect"),
        capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "logs").glob("*"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    _assert_completed(out)


def test_gpu_spec_makes_gres_jobs_of_gpu_workers():
    """What a GPU spec submits (dask-jobqueue's own job script; nothing submitted)."""
    from copgen.flows.clusters import WORKER_ENV, slurm_options
    from dask_jobqueue.slurm import SLURMJob

    kw, jobs = slurm_options({"jobs": 3, "gpus_per_job": 4, "cores": 32, "memory": "200GB",
                              "walltime": "08:00:00", "queue": "gpu"})
    assert jobs == 3
    script = SLURMJob(scheduler="tcp://10.0.0.1:8786", name="copgen", **kw).job_script()
    assert "#SBATCH --gres=gpu:4" in script and "#SBATCH -p gpu" in script
    assert "--nworkers 4" in script and "--resources GPU=1" in script
    assert f"export MALLOC_MMAP_THRESHOLD_={WORKER_ENV['MALLOC_MMAP_THRESHOLD_']}" in script


def test_slurm_spec_errors_are_one_line(tmp_path):
    from copgen.flows.clusters import ClusterError, open_cluster, parse_cluster

    spec = tmp_path / "bad.yaml"
    spec.write_text("cores: 1\nmemory: 1GB\nnot_an_option: 3\n")
    with pytest.raises(ClusterError, match="slurm:.*bad.yaml.*not_an_option"), \
            open_cluster(parse_cluster(f"slurm:{spec}")):
        pass
    with pytest.raises(ClusterError, match="cannot read the cluster spec"), \
            open_cluster(parse_cluster(f"slurm:{tmp_path / 'missing.yaml'}")):
        pass


def test_example_spec_is_valid_for_slurmcluster():
    from copgen.flows.clusters import read_slurm_spec, slurm_options
    from dask_jobqueue.slurm import SLURMJob

    kw, jobs = slurm_options(read_slurm_spec(str(REPO / "infra/slurm/cluster-spec.yaml")))
    script = SLURMJob(scheduler="tcp://10.0.0.1:8786", name="copgen", **kw).job_script()
    assert jobs == 2 and "#SBATCH --gres=gpu:4" in script


