"""The error root, and exceptions that survive a trip between processes.

Every error that copgen raises on purpose (bad input, a refused store, an unreachable service) derives from
:class:`CopgenError`; the CLI turns exactly those into one line and an exit code, so anything else (a bug)
still prints its traceback.

Dask and Prefect pickle a worker's exception to report it in the driver. Python re-creates an exception
by calling ``cls(*self.args)``, which fails for classes whose ``__init__`` takes other arguments than
the message (the driver then sees a confusing ``TypeError`` instead of the real error). Subclassing
:class:`PicklableError` restores the instance as it was: same message, same attributes.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def _restore(cls: type[BaseException], args: tuple, state: dict[str, Any]) -> BaseException:
    exc = cls.__new__(cls)
    BaseException.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class PicklableError(Exception):
    """Mixin: pickle by message and attributes, not by re-running ``__init__``."""

    def __reduce__(self):
        return _restore, (type(self), self.args, dict(self.__dict__))


class CopgenError(PicklableError):
    """Root of copgen's own errors: the CLI reports these in one line (``exit_code``), never a traceback."""

    exit_code = 2


class TrainingError(CopgenError, ValueError):
    """A training request that cannot run (bad config, data too small, incompatible saved state). Here, not
    in ``copgen.train``, so that the ``TrainJob`` validation raises it without importing torch."""


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment: safe to put in logs and error messages (the one
    redaction rule: storage and the checkpoint loader both use it)."""
    if "://" not in url:
        return url
    split = urlsplit(url)
    netloc = split.netloc.rsplit("@", 1)[-1]
    return urlunsplit((split.scheme, netloc, split.path, "", ""))


_USERINFO = re.compile(r"[^\s/:@'\"]+:[^\s/@'\"]+@")


def describe_error(exc: BaseException) -> str:
    """``Type: first line`` of an exception, with anything shaped like ``user:secret@`` masked: libraries
    quote the URL they were given."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = _USERINFO.sub("***@", text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class StorageUnavailableError(CopgenError, ConnectionError):
    """Object storage (or a file system) could not be reached after the retries: infrastructure, exit 4.
    Never a reason to quarantine an input (the input may be fine); a ``ConnectionError``, so block tasks
    retry it."""

    exit_code = 4


# Connection-level errno values: the other side is gone or unreachable (not a bad path or permission).
_NET_ERRNOS = frozenset({104, 111, 103, 113, 101, 110, 32})  # ECONNRESET, ECONNREFUSED, ECONNABORTED,
# EHOSTUNREACH, ENETUNREACH, ETIMEDOUT, EPIPE (Linux numbers)


def unreachable(exc: BaseException | None) -> BaseException | None:
    """The exception in ``exc``'s cause chain that says a storage service could not be reached, or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = f"{type(exc).__module__}.{type(exc).__name__}"
        if name.endswith("OfflineModeIsEnabled"):  # the user chose offline mode: their input, not an outage
            return None
        if name.startswith(("botocore.", "aiobotocore.", "aiohttp.")) and any(
                k in name for k in ("Connect", "Endpoint", "Timeout", "Disconnected", "ConnectionClosed",
                                    "ClientOSError", "ReadTimeout")):
            return exc
        if isinstance(exc, ConnectionError | TimeoutError) or (
                isinstance(exc, OSError) and exc.errno in _NET_ERRNOS):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
