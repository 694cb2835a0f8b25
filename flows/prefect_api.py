"""One Prefect API for the whole run.

A driver relying on Prefect's ephemeral default makes every Dask worker process start its own temporary
server (12-18 s each, one SQLite file shared by all: pipeline-stack.md §2.2). So the driver either uses
the server named by ``PREFECT_API_URL`` (production: ``prefect server start`` or Prefect Cloud) or starts
one temporary server itself and pins its URL; the pinned settings travel to the workers with each task.
That server dies with the driver, however the driver ends (``copgen.flows.reaper``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from copgen.errors import CopgenError
from copgen.flows.reaper import Reaper

# How long the temporary server may take to answer (it competes with the run for the CPUs at start-up).
START_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_START_TIMEOUT_S = 90

# Quiet, offline-friendly defaults; users' explicit settings win. Prefect reads its settings when it is
# first imported, so ``quiet_defaults()`` must run before that (the CLI calls it at import time); the start
# timeout is also handed to the server explicitly, so it holds even when Prefect was imported earlier.
_QUIET = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    START_TIMEOUT_ENV: str(DEFAULT_START_TIMEOUT_S),
}


class PrefectStartError(CopgenError):
    """The temporary Prefect server did not come up (infrastructure: exit 4)."""

    exit_code = 4


def quiet_defaults() -> None:
    for key, value in _QUIET.items():
        os.environ.setdefault(key, value)


def start_timeout_s() -> int:
    """Seconds to wait for the temporary server: ``$PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, 90."""
    raw = os.environ.get(START_TIMEOUT_ENV, "")
    try:
        return max(1, int(float(raw)))
    except ValueError:
        return DEFAULT_START_TIMEOUT_S


def _server_type():
    """Prefect's temporary server, its process tied to a ``Reaper`` as soon as it exists (Prefect may
    replace it while starting, on a port clash), so even a SIGKILLed driver leaves no server behind."""
    from prefect.server.api.server import SubprocessASGIServer

    class TiedServer(SubprocessASGIServer):
        reaper: Reaper | None = None

        def _run_uvicorn_command(self):
            proc = super()._run_uvicorn_command()
            if self.reaper is not None:
                self.reaper.tie(proc.pid)
            return proc

    return TiedServer


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the API URL every process of this run uses, starting a temporary server only if none is set."""
    quiet_defaults()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    existing = PREFECT_API_URL.value()
    if existing:
        yield existing
        return
    with Reaper() as reaper:
        server = _server_type()()
        server.reaper = reaper
        timeout = start_timeout_s()
        try:
            server.start(timeout=timeout)
        except RuntimeError as exc:
            server.stop()
            raise PrefectStartError(
                f"the temporary Prefect server did not answer within {timeout} s "
                f"({str(exc).splitlines()[0]}); raise {START_TIMEOUT_ENV}, or point PREFECT_API_URL at a "
                f"running server") from exc
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                # Worker processes spawned from here inherit the environment as well as the settings context.
                previous = os.environ.get("PREFECT_API_URL")
                os.environ["PREFECT_API_URL"] = server.api_url
                try:
                    yield server.api_url
                finally:
                    if previous is None:
                        os.environ.pop("PREFECT_API_URL", None)
                    else:
                        os.environ["PREFECT_API_URL"] = previous
        finally:
            server.stop()
