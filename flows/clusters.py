"""One way to get a Dask cluster from a user-facing option.

``--cluster`` takes:

- ``local``: a CPU ``LocalCluster`` of worker *processes* (one thread each: torch parallelises inside);
- ``local-cuda``: ``dask_cuda.LocalCUDACluster``, one worker per visible GPU, each declaring ``GPU=1``
  (optional extra ``copgen[cuda]``);
- ``slurm`` or ``slurm:<spec.yaml>``: a dask-jobqueue ``SLURMCluster`` submitting worker jobs (optional
  extra ``copgen[slurm]``); the spec file holds its keyword arguments (``cores``, ``memory``,
  ``walltime``, ``queue``, ``account``, ...) plus ``jobs`` (how many) and ``gpus_per_job`` (a
  ``--gres=gpu:N`` directive, one worker process per GPU declaring ``GPU=1``); without a file, dask's
  ``jobqueue.slurm`` configuration;
- a scheduler address, ``tcp://host:8786`` (Kubernetes operator, infra/slurm's batch script, a cloud
  service, or ``dask scheduler`` + ``dask worker --resources GPU=1`` by hand).

The driver owns the cluster (so it can print the dashboard link and reuse one cluster for several flows);
flows receive only the scheduler address and build ``DaskTaskRunner(address=...)`` from it — handing
prefect-dask a live cluster object makes the flow context unpicklable (pipeline-stack.md §2.5.6).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from copgen.errors import CopgenError

_ADDRESS = re.compile(r"^(tcp|tls|ucx|inproc|ws|wss)://[^\s/]+(:\d+)?$")


class ClusterError(CopgenError, ValueError):
    """A ``--cluster`` option that names no cluster we can make or reach."""


@dataclass(frozen=True)
class ClusterSpec:
    kind: str  # "local" | "local-cuda" | "slurm" | "address"
    address: str | None = None
    spec_file: str | None = None  # slurm: the SLURMCluster spec (None: dask's jobqueue.slurm config)
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | None = None
    # local clusters: the level from which worker processes log themselves (Dask's silence_logs); the CLI
    # raises it to CRITICAL unless --verbose, since a run that ends early (a refused lease, an error,
    # Ctrl-C) made each worker log its own shutdown (a cancelled task, a heartbeat traceback) after the
    # driver's one-line report
    worker_log_level: int = 30  # logging.WARNING, Dask's default

    @property
    def has_gpu_workers(self) -> bool:
        # An external cluster may hold GPU workers; we learn that from the workers' resources at run time.
        return self.kind == "local-cuda"


def parse_cluster(option: str, n_workers: int | None = None, memory_limit: str | None = None) -> ClusterSpec:
    """``local`` | ``local-cuda`` | ``slurm[:spec.yaml]`` | ``tcp://host:port`` → a :class:`ClusterSpec`
    (clear error otherwise)."""
    text = (option or "").strip()
    if text in ("local", "local-cuda"):
        return ClusterSpec(kind=text, n_workers=n_workers, memory_limit=memory_limit)
    if text == "slurm" or text.startswith("slurm:"):
        return ClusterSpec(kind="slurm", spec_file=text.partition(":")[2] or None)
    if _ADDRESS.match(text):
        return ClusterSpec(kind="address", address=text)
    raise ClusterError(
        f"--cluster {option!r}: expected 'local', 'local-cuda', 'slurm[:spec.yaml]' or a scheduler address "
        "like tcp://host:8786"
    )


# The optional extra each kind needs: (module, the error when it is missing).
_EXTRAS = {"slurm": ("dask_jobqueue", "--cluster slurm needs dask-jobqueue: pip install 'copgen[slurm]'"),
           "local-cuda": ("dask_cuda", "--cluster local-cuda needs dask-cuda: pip install 'copgen[cuda]'")}


def check_cluster(spec: ClusterSpec) -> None:
    """What :func:`open_cluster` would refuse before it starts anything (a missing extra, an unreadable
    slurm spec file), with the same messages; imports neither Dask nor the extra (fail fast)."""
    import importlib.util

    if spec.kind in _EXTRAS and importlib.util.find_spec(_EXTRAS[spec.kind][0]) is None:
        raise ClusterError(_EXTRAS[spec.kind][1])
    if spec.kind == "slurm":
        read_slurm_spec(spec.spec_file)


def slurm_options(spec: dict[str, Any] | None) -> tuple[dict[str, Any], int]:
    """SLURMCluster keyword arguments and the number of jobs from a cluster spec (see the module doc).
    Workers get :data:`WORKER_ENV` in their job script; GPU jobs a ``--gres`` line and ``GPU=1`` workers."""
    kw = dict(spec or {})
    jobs = int(kw.pop("jobs", 1))
    gpus = int(kw.pop("gpus_per_job", 0))
    if gpus:
        kw.setdefault("processes", gpus)  # one worker process per GPU
        kw["job_extra_directives"] = [*kw.get("job_extra_directives", []), f"--gres=gpu:{gpus}"]
        kw["worker_extra_args"] = [*kw.get("worker_extra_args", []), "--resources", "GPU=1"]
    kw["job_script_prologue"] = [*kw.get("job_script_prologue", []),
                                 *(f"export {k}={v}" for k, v in WORKER_ENV.items())]
    return kw, jobs


def read_slurm_spec(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    import fsspec
    import yaml

    try:
        with fsspec.open(path, "r") as f:
            spec = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ClusterError(f"--cluster slurm:{path}: cannot read the cluster spec: {exc}") from exc
    if not isinstance(spec, dict):
        raise ClusterError(f"--cluster slurm:{path}: expected a mapping of SLURMCluster options")
    return spec


def _has_dashboard() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


# The scheduler's HTTP server (dashboard with bokeh; health and metrics routes without) on a free port:
# the default 8787 fights with any other cluster on the machine.
_HTTP_ADDRESS = ":0"


# Environment of the worker processes we start. Dask gives them MALLOC_TRIM_THRESHOLD_=64 KiB, which also
# freezes glibc's mmap threshold at 128 KiB: every larger tensor buffer is then a fresh mmap and page
# faults. Measured on the bundled model: torch inference 1.6x slower in such a worker (system time 0.7 ->
# 6.8 s per 32 samples). A 32 MiB mmap threshold (glibc's maximum) keeps those buffers on the heap; Dask's
# trimming stays. Workers of an external cluster need it in their environment: infra/ sets it.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432"}
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _worker_env(cpu_threads: int = 1):
    """``WORKER_ENV`` and ``cpu_threads`` BLAS/OpenMP threads (torch's CPU threads) for the workers spawned
    inside; Dask's default of 1 would leave cores idle when there are fewer workers than cores."""
    import dask

    env = {**WORKER_ENV, **{k: str(cpu_threads) for k in _THREAD_VARS}}
    return dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in env.items()})



@contextlib.contextmanager
def open_cluster(spec: ClusterSpec) -> Iterator[tuple[str, str | None]]:
    """Start (or reach) the cluster; yields ``(scheduler_address, dashboard_link or None)``.

    Clusters we start are closed on exit; an external scheduler is left as it was.
    """
    if spec.kind == "address":
        yield spec.address, _reach(spec.address)
        return
    if spec.kind == "slurm":
        cluster = _slurm_cluster(spec)
        try:
            yield cluster.scheduler_address, cluster.dashboard_link if _has_dashboard() else None
        finally:
            cluster.close()
        return
    cluster = _local_cuda_cluster(spec) if spec.kind == "local-cuda" else _local_cluster(spec)
    try:
        link = cluster.dashboard_link if _has_dashboard() else None
        yield cluster.scheduler_address, link
    finally:
        _close_workers(cluster)
        cluster.close()


def _reach(address: str) -> str | None:
    """Check that the scheduler at ``address`` answers; its dashboard link, when it has one."""
    from distributed import Client

    try:
        with Client(address, timeout="20s") as client:
            services = client.scheduler_info().get("services", {})
            return client.dashboard_link if "dashboard" in services else None
    except OSError as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc


def _slurm_cluster(spec: ClusterSpec):
    """A dask-jobqueue SLURM cluster scaled to the spec's jobs (the flow's tasks wait in the scheduler
    until the jobs' workers join)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise ClusterError(_EXTRAS["slurm"][1]) from exc
    kw, jobs = slurm_options(read_slurm_spec(spec.spec_file))
    kw.setdefault("scheduler_options", {}).setdefault("dashboard_address", _HTTP_ADDRESS)
    try:
        cluster = SLURMCluster(**kw)
    except (TypeError, ValueError) as exc:  # an unknown option, or no cores/memory anywhere
        where = f"slurm:{spec.spec_file}" if spec.spec_file else "slurm"
        raise ClusterError(f"--cluster {where}: {exc}") from exc
    cluster.scale(jobs=jobs)
    return cluster


def _local_cuda_cluster(spec: ClusterSpec):
    """One worker per local GPU, each with a ``GPU`` resource."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ClusterError(_EXTRAS["local-cuda"][1]) from exc
    with _worker_env():
        return LocalCUDACluster(
            threads_per_worker=spec.threads_per_worker,
            resources={"GPU": 1},
            dashboard_address=_HTTP_ADDRESS,
            host="127.0.0.1",
        )


def _local_cluster(spec: ClusterSpec):
    """Local worker processes sharing out this machine's cores."""
    from distributed import LocalCluster

    n = spec.n_workers or max(1, min(4, (os.cpu_count() or 2)))
    # the cores shared out between the workers' concurrent tasks
    per_task = max(1, (os.cpu_count() or 1) // (n * spec.threads_per_worker))
    with _worker_env(cpu_threads=per_task):
        return LocalCluster(
            n_workers=n,
            processes=True,
            threads_per_worker=spec.threads_per_worker,
            # the thread counts also as the nannies' own env (applied in the child before torch loads), so
            # they never depend on the global Dask config at spawn time (a suite-order flake showed 1)
            env={k: str(per_task) for k in _THREAD_VARS},
            memory_limit=spec.memory_limit or "auto",
            dashboard_address=_HTTP_ADDRESS,
            host="127.0.0.1",  # offline hosts cannot "detect a suitable IP" (pipeline-stack.md §2.5.5)
            silence_logs=spec.worker_log_level,
        )


def _close_workers(cluster, grace_s: float = 30.0) -> None:
    """Close a local cluster's worker processes with a grace period. ``cluster.close()`` gives each one
    4 s before the nanny kills it with a warning ("Worker process still alive after 4.0 seconds"), too
    short for a worker still flushing its Prefect task-run logs on a busy machine."""
    import asyncio

    async def close_all() -> None:
        await asyncio.gather(*(w.close(timeout=grace_s) for w in list(cluster.workers.values())),
                             return_exceptions=True)

    with contextlib.suppress(Exception):  # cluster.close() below still closes whatever is left
        cluster.sync(close_all)


def task_runner(address: str):
    """A prefect-dask task runner bound to a running scheduler."""
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)


def gpu_workers(address: str) -> int:
    """How many workers of the cluster declare a ``GPU`` resource (0: annotate nothing)."""
    from distributed import Client

    with Client(address, timeout="20s") as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        return sum(1 for w in workers if w.get("resources", {}).get("GPU", 0) > 0)


@contextlib.contextmanager
def gpu_annotation(enabled: bool) -> Iterator[None]:
    """Annotate the tasks submitted inside with ``resources={"GPU": 1}`` when GPU workers exist: one GPU
    task per GPU worker at a time, and CPU-only workers never receive model work."""
    if not enabled:
        yield
        return
    import dask

    with dask.annotate(resources={"GPU": 1}):
        yield
