"""Scheduled dataset completion: the ``complete`` flow as a cron deployment, incremental by the ledger.

A scheduled run re-plans from the source's metadata and adds only the samples the cube does not hold
yet (and resumes unfinished blocks), so the same deployment can run every night. Schedules need a real
Prefect server (``prefect server start`` or Prefect Cloud): the temporary server never creates runs.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from copgen.errors import CopgenError
from copgen.flows.complete import complete_flow


class DeployError(CopgenError, ValueError):
    """A schedule or deployment option that Prefect would refuse."""


def validate_cron(cron: str, timezone: str = "UTC") -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except Exception as exc:  # pydantic's ValidationError: say which option, not a model dump
        raise DeployError(f"--cron {cron!r} (timezone {timezone}): not a valid cron schedule") from exc


def build_deployment(name: str, cron: str, parameters: dict[str, Any], timezone: str = "UTC",
                     description: str | None = None):
    """The deployment object (no API call): ``complete`` with ``parameters`` on ``cron``."""
    validate_cron(cron, timezone)
    from prefect.schedules import Cron

    return complete_flow.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters=parameters,
        description=description or "Nightly Major TOM dataset completion with COP-GEN-Beta (incremental).",
        tags=["copgen", "complete"],
    )


def next_runs(cron: str, n: int = 3, start: datetime | None = None, timezone: str = "UTC") -> list[datetime]:
    """The next ``n`` fire times of the schedule after ``start`` (default now), computed locally with
    the server's own schedule model (no API needed)."""
    from prefect.server.schemas.schedules import CronSchedule

    sched = CronSchedule(cron=cron, timezone=timezone)
    dates = sched.get_dates(n=n, start=start or datetime.now(UTC))
    if asyncio.iscoroutine(dates):
        dates = asyncio.run(dates)
    return [datetime.fromisoformat(str(d)) if not isinstance(d, datetime) else d for d in dates]
