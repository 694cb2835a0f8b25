"""One Prefect API for the whole run.

A driver relying on Prefect's ephemeral default makes every Dask worker process start its own temporary
server (12-18 s each, one SQLite file shared by all: pipeline-stack.md §2.2). So the driver either uses
the server named by ``PREFECT_API_URL`` (production: ``prefect server start`` or Prefect Cloud) or starts
one temporary server itself and pins its URL; the pinned settings travel to the workers with each task.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Quiet, offline-friendly defaults; users' explicit settings win.
_QUIET = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


def quiet_defaults() -> None:
    for key, value in _QUIET.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the API URL every process of this run uses, starting a temporary server only if none is set."""
    quiet_defaults()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    existing = PREFECT_API_URL.value()
    if existing:
        yield existing
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
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
