"""Shared driver-side plumbing of the flows: run info, Prefect tasks over blocks, the block fan-out."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from copgen import package_version
from copgen.errors import StorageUnavailableError
from copgen.flows import artifacts
from copgen.flows.clusters import gpu_annotation, gpu_workers, open_cluster, parse_cluster, task_runner
from copgen.flows.jobs import RunInfo, SourceSpec
from copgen.flows.models import ModelSpec, get_copgen, sample_size
from copgen.storage.checkpoint_files import sha256_of
from copgen.storage.majortom.world import read_world
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

log = logging.getLogger("copgen")



def is_synthetic(source: SourceSpec) -> bool:
    """A source written by ``copgen world`` carries a world descriptor beside its datasets."""
    world = read_world(source.root, source.storage_options)
    return world is not None and world.synthetic


def run_info(run_id: str, run_seed: int, model: ModelSpec, source: SourceSpec, patch_mode: str,
             invalid_rows: str = "quarantine") -> RunInfo:
    """Provenance of the run; loads the model once in the driver to learn its sample size (and fails
    here, clearly, rather than in every worker, when a checkpoint is wrong)."""
    so = model.storage_options or None
    net_sha = model.weights_sha256 or sha256_of(model.weights, so)
    vae_sha = model.vae_sha256 or sha256_of(model.vae, so)
    copgen = get_copgen(ModelSpec(**{**model.__dict__, "device": "cpu", "dtype": "float32"}))
    return RunInfo(run_id=run_id, run_seed=run_seed, model=model, network_sha256=net_sha,
                   autoencoder_sha256=vae_sha, package_version=package_version(),
                   synthetic=is_synthetic(source), sample_size=sample_size(copgen),
                   latent_shape=tuple(copgen.latent_shape), patch_mode=patch_mode,
                   invalid_rows=invalid_rows)


def _transient(task, task_run, state) -> bool:
    """Retry I/O hiccups (network, S3 throttling), never deterministic failures (bad input, bugs)."""
    try:
        state.result()
    except StorageUnavailableError:  # storage/retry.py already retried it with backoff: exit 4, not 3x8 tries
        return False
    except (OSError, TimeoutError, ConnectionError):
        return True
    except Exception:  # noqa: BLE001 - anything else is not worth a retry
        return False
    return False


@task(name="process-block", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient,
      cache_policy=NO_CACHE, persist_result=False)
def block_task(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One work block (never one sample: a Prefect task costs ~0.1-0.2 s, pipeline-stack.md §2.4). A
    :class:`~copgen.storage.plans.PlanRef` argument is the block's plan by reference: read here, on the
    worker (only that block's rows), so the driver never ships or holds a whole run's plan."""
    from copgen.storage.plans import PlanRef

    args = tuple(a.load() if isinstance(a, PlanRef) else a for a in args)
    return fn(*args, **kwargs)


# The driver's progress display. Not a flow parameter: parameters travel in the flow-run context that
# is pickled with every task, and a live progress bar (threads, a console) cannot be pickled.
_PROGRESS: contextvars.ContextVar[Any] = contextvars.ContextVar("copgen_progress", default=None)


@contextlib.contextmanager
def reporting_progress(progress) -> Iterator[None]:
    """Show block progress on ``progress`` (``start(blocks, samples)``, ``advance(summary)``, ``stop()``)."""
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)
        if progress is not None:
            progress.stop()


def fan_out(address: str | None, calls: Sequence[tuple[Callable, tuple, dict]], samples: int = 0,
            ) -> list[dict[str, Any]]:
    """Submit one task per block (GPU-annotated where the cluster has GPU workers); collect the block
    summaries as they finish, advancing the driver's progress display."""
    from prefect.futures import as_completed

    progress = _PROGRESS.get()
    if progress is not None:
        progress.start(len(calls), samples)
    meter = ProgressMeter(len(calls), samples)
    run_log = _run_logger()
    with gpu_annotation(bool(address) and gpu_workers(address) > 0):
        futures = [block_task.submit(fn, *args, **kwargs) for fn, args, kwargs in calls]
    results = []
    for fut in as_completed(futures):
        res = fut.result()
        results.append(res)
        meter.advance(res.get("samples", 0))
        run_log.info("%s", meter.line())  # the flow run's log: a scheduler's or the Prefect UI's progress
        if progress is not None:
            progress.advance(res)
    return sorted(results, key=lambda r: r["block"])


class ProgressMeter:
    """Blocks and samples done of a fan-out, the rate and the time left, as one plain line."""

    def __init__(self, blocks: int, samples: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.blocks, self.samples, self.clock = blocks, samples, clock
        self.blocks_done = self.samples_done = 0
        self.t0 = clock()

    def advance(self, samples: int) -> None:
        self.blocks_done += 1
        self.samples_done += int(samples)

    def line(self) -> str:
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = self.samples_done / elapsed
        left = self.samples - self.samples_done
        eta = _duration(left / rate) if rate > 0 and left > 0 else ("0s" if left <= 0 else "?")
        return (f"blocks {self.blocks_done}/{self.blocks}, samples {self.samples_done}/{self.samples}, "
                f"{rate:.2f} samples/s, elapsed {_duration(elapsed)}, ETA {eta}")


def run_on_cluster(name: str, body: Callable[..., dict[str, Any]], job: Any, cluster: str,
                   workers: int | None, *, artifact: str, count: str) -> dict[str, Any]:
    """A deployable flow's run: open the cluster, run ``body(job, address=…)`` as the subflow ``name`` on
    it, and publish the run's artifact (``summary[count]`` samples)."""
    with open_cluster(parse_cluster(cluster, n_workers=workers)) as (address, link):
        if link:
            print(f"Dask dashboard: {link}")
        runner = flow(name=name, task_runner=task_runner(address))(body)
        t0 = time.perf_counter()
        summary = runner(job, address=address)
    artifacts.publish(artifact, summary, time.perf_counter() - t0, summary[count])
    return summary


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60
                                                                   else f"{s}s")


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow run (its lines go to the run's log), else ours."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


GENERATION_SETTINGS = ("network_sha256", "autoencoder_sha256", "sampler", "steps", "dtype", "run_seed")


def warn_if_settings_changed(cube_attrs: Mapping[str, Any], info: RunInfo, done_samples: int,
                             cube_url: str) -> str | None:
    """A rerun only adds what is missing. When its generation settings differ from the cube's earlier
    runs, say that the existing samples are kept (not regenerated) and how to get new ones. Returns the
    warning (None when nothing changed or nothing was done before)."""
    runs = dict(cube_attrs.get("copgen_runs") or {})
    runs.pop(info.run_id, None)
    if not runs or not done_samples:
        return None
    now = info.provenance()
    before = list(runs.values())[-1]
    changed = [f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in GENERATION_SETTINGS
               if k in before and before.get(k) != now.get(k)]
    if not changed:
        return None
    from copgen.storage.objects import redact

    text = (f"{redact(cube_url)}: generation settings differ from the earlier run ({'; '.join(changed)}): "
            f"its {done_samples} finished samples are kept, not regenerated; this run only adds new cells "
            "and unfinished blocks. To regenerate everything with the new settings, write to a new --out.")
    run_log = _run_logger()
    if run_log is not log:  # the flow run's log (Prefect UI, a scheduler's log)
        run_log.warning("%s", text)
    log.warning("%s", text)  # the console, also in the CLI's quiet mode
    return text
