"""Scheduled dataset completion: the ``complete`` flow as a cron deployment, incremental by the ledger.

A scheduled run re-plans from the source's metadata and adds only the samples the cube does not hold
yet (and resumes unfinished blocks), so the same deployment can run every night. Schedules need a real
Prefect server (``prefect server start`` or Prefect Cloud): the temporary server never creates runs, so
registering and serving both refuse to start without ``PREFECT_API_URL``.

The entrypoint is a *module path* (``copgen.flows.complete.complete_flow``, Prefect's dotted form: with
a colon Prefect treats it as a file entrypoint and, serving, first copies a code folder): the code is the
installed package (in the image: ``/opt/copgen``, installed into site-packages), never a file of the deploying
machine's checkout. A file-path entrypoint also makes Prefect put ``flows/`` on ``sys.path``, where any
module named like a standard-library one shadows it (tests/flows/test_module_names.py pins that none is).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from copgen.errors import CopgenError
from copgen.flows.complete import complete_flow

ENTRYPOINT = "copgen.flows.complete.complete_flow"
DEFAULT_POOL = "copgen-pool"


class DeployError(CopgenError, ValueError):
    """A schedule or deployment option that Prefect would refuse, or no server to register on."""


def validate_cron(cron: str, timezone: str = "UTC") -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except Exception as exc:  # pydantic's ValidationError: say which option, not a model dump
        raise DeployError(f"--cron {cron!r} (timezone {timezone}): not a valid cron schedule") from exc


def build_deployment(name: str, cron: str, parameters: dict[str, Any], timezone: str = "UTC",
                     description: str | None = None):
    """The deployment object (no API call): ``complete`` with ``parameters`` on ``cron``, loaded by
    workers from the installed package (:data:`ENTRYPOINT`)."""
    validate_cron(cron, timezone)
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    deployment = complete_flow.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters=parameters,
        description=description or "Nightly Major TOM dataset completion with COP-GEN-Beta (incremental).",
        tags=["copgen", "complete"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    # (what MODULE_PATH yields) no colon: runs import the package instead of copying a code folder first
    deployment.entrypoint = ENTRYPOINT
    return deployment


def require_server() -> str:
    """The URL of the Prefect server at ``PREFECT_API_URL``, checked reachable (one-line error otherwise)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError(
            "no Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api after "
            "`prefect server start`); schedules never fire on Prefect's temporary server")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise DeployError(f"Prefect server at PREFECT_API_URL={url} is not reachable: {problem}")
    return url


def ensure_work_pool(name: str = DEFAULT_POOL) -> bool:
    """Create the process work pool ``name`` with Prefect's default job template unless it exists.
    Returns whether it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
            return True


def register(deployment, pool: str = DEFAULT_POOL):
    """Register ``deployment`` for ``pool`` on the server (created if missing); returns its id. Workers
    of the pool (``prefect worker start --pool <pool>``) then run its scheduled runs."""
    url = require_server()
    import httpx
    from prefect.exceptions import PrefectException

    try:
        ensure_work_pool(pool)
        return deployment.apply(work_pool_name=pool)
    except (PrefectException, httpx.HTTPError) as exc:  # the server refused: one line, not a traceback
        raise DeployError(f"registering {deployment.name!r} on {url} for pool {pool!r}: {exc}") from exc


def next_runs(cron: str, n: int = 3, start: datetime | None = None, timezone: str = "UTC") -> list[datetime]:
    """The next ``n`` fire times of the schedule after ``start`` (default now), computed locally with
    the server's own schedule model (no API needed)."""
    from prefect.server.schemas.schedules import CronSchedule

    sched = CronSchedule(cron=cron, timezone=timezone)
    dates = sched.get_dates(n=n, start=start or datetime.now(UTC))
    if asyncio.iscoroutine(dates):
        dates = asyncio.run(dates)
    return [datetime.fromisoformat(str(d)) if not isinstance(d, datetime) else d for d in dates]
