"""Warm the Dask workers while the driver plans.

A fresh worker process pays, on its first block, for importing torch, the block code and Prefect's task
engine (measured: about 4 CPU-seconds each on the 2-core test machine, 8-10 s of wall time when it is
loaded) and for loading the model. Those costs used to start only once the driver had planned, grown
the cube and submitted the blocks. ``warm_workers`` hands each worker one small task at the very start
of a run instead: it imports that code and loads the run's model into the worker's cache
(``flows/models.get_copgen``), so both run beside the driver's own start (flow run, model check, plan,
cube growth) and the first block finds everything in place. On a warm (long-lived) cluster the task
finds the model cached and returns at once.

Imports happen where the task is unpickled (this module's top level), not in the task: a worker unpickles
the next task (the Prefect block task, which imports Prefect) while it runs this one, and Prefect's lazy
imports in two threads at once can deadlock on the import locks. A worker unpickles task messages on its
event loop, one at a time, so importing here keeps every import of a warm worker in that one thread; the
task itself (on the worker's executor thread) only loads the model.

The warm-up is an optimisation only: a failure in it (a bad checkpoint, a lost worker) is ignored here,
the driver's own checks and the blocks report it as before. GPU clusters: only workers declaring a
``GPU`` resource are warmed (the blocks run only there; a CPU-only worker never loads the model).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator

import prefect.task_engine  # noqa: F401 - the engine every Prefect task run goes through
import safetensors  # noqa: F401 - the checkpoint format (loaded lazily by copgen.checkpoints)
from copgen.flows import blocks  # noqa: F401 - torch, zarr, the readers, the block code
from copgen.flows.models import ModelSpec, get_copgen

log = logging.getLogger("copgen.warmup")


def warm_worker(model: ModelSpec) -> str:
    """Run inside a worker (its imports done by unpickling this function): load ``model`` into the
    process's cache. Returns ``"ok"`` or the reason it could not (never raises: the run reports it)."""
    try:
        get_copgen(model)
    except Exception as exc:  # noqa: BLE001 - an optimisation; the run reports real errors itself
        return f"{type(exc).__name__}: {exc}"
    return "ok"


@contextlib.contextmanager
def warm_workers(address: str | None, model: ModelSpec) -> Iterator[list]:
    """Start :func:`warm_worker` on every (GPU) worker of the cluster at ``address`` without waiting;
    yields their Dask futures (callers need not wait on them); they are released on exit (one still
    queued then is cancelled, never run late)."""
    client, futures = None, []
    if address:
        try:
            from distributed import Client

            client = Client(address, timeout="20s", set_as_default=False)
            workers = client.scheduler_info(n_workers=-1)["workers"]
            gpu = [w for w, info in workers.items() if info.get("resources", {}).get("GPU", 0) > 0]
            tag = uuid.uuid4().hex[:8]
            futures = [client.submit(warm_worker, model, key=f"copgen-warmup-{tag}-{i}", workers=[w],
                                     allow_other_workers=False, pure=False)
                       for i, w in enumerate(gpu or list(workers))]
        except Exception as exc:  # noqa: BLE001 - the fan-out meets (and reports) the same problem
            log.debug("no worker warm-up: %s", exc)
    try:
        yield list(futures)
    finally:
        futures.clear()
        if client is not None:
            client.close()
