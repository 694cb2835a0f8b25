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


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment: safe to put in logs and error messages (the one
    redaction rule: storage and the checkpoint loader both use it)."""
    if "://" not in url:
        return url
    split = urlsplit(url)
    netloc = split.netloc.rsplit("@", 1)[-1]
    return urlunsplit((split.scheme, netloc, split.path, "", ""))
