"""The CLI's exit-code policy: which failures are one line and a hint, and with which exit code.

    0    done
    2    user input: options, source, checkpoint, an output path that is not ours (CopgenError default)
    3    partial: samples quarantined (unless --allow-partial)
    4    infrastructure: storage unreachable after retries, the output's filesystem full, cluster lost,
         Prefect server did not start
    130  interrupted (Ctrl-C); 143 terminated (SIGTERM); both shut the run's server and cluster down

Exactly :class:`copgen.errors.CopgenError` (and the errors of option checking: ``ValueError``, a missing or
unreadable local file) become one line; failures of storage and the cluster, which arrive as botocore,
aiohttp, OSError (ENOSPC: a full disk) or Dask exceptions, are translated here into CopgenError subclasses
with exit code 4. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal

from copgen.errors import CopgenError, StorageUnavailableError, unreachable

EXIT_USER, EXIT_PARTIAL, EXIT_INFRA, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 3, 4, 130, 143

HINTS = {
    EXIT_USER: "check the option or input named above; `--help` shows an example of each option",
    EXIT_INFRA: "nothing that was committed is lost: fix the service and rerun the same command; it resumes",
}

class ClusterLostError(CopgenError):
    """The Dask cluster lost the work (workers died repeatedly, the scheduler went away)."""

    exit_code = EXIT_INFRA


class DiskFullError(CopgenError):
    """The output's filesystem is full (or over quota): infrastructure, exit 4. The blocks written before
    are committed; after freeing space the same command resumes."""

    exit_code = EXIT_INFRA
    hint = "free space on the output's filesystem and rerun the same command: it resumes where it stopped"


class InputError(CopgenError):
    """An option value or a local input named on the command line is wrong, missing or unreadable."""


def _infra(cls: type[CopgenError], exc: BaseException, fallback: str) -> CopgenError:
    """Exit 4, keeping our own message (it names the file or URL) when the failure came wrapped in one."""
    err = cls(str(exc) if isinstance(exc, CopgenError) else fallback)
    err.__cause__ = exc
    return err


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__name__}"


# Packages whose frames say nothing about who timed out (the waiting happened in them for someone else).
_PLUMBING = ("asyncio", "concurrent", "socket", "ssl", "selectors", "threading", "contextlib", "tornado",
             "anyio", "functools")


def _raised_by(exc: BaseException) -> str:
    """The top-level package of the innermost frame of ``exc``'s traceback outside the plumbing above,
    e.g. ``distributed`` for a TimeoutError of ``asyncio.wait_for`` inside a Dask client call."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    for module in reversed(frames):
        top = module.split(".", 1)[0]
        if top and top not in _PLUMBING:
            return top
    return ""


def _timeout_elsewhere(e: BaseException) -> CopgenError | None:
    """A builtin timeout or lost connection raised by Dask or Prefect: the cluster or the Prefect API did
    not answer, not the storage (which ``unreachable`` would otherwise conclude from the type alone)."""
    if not isinstance(e, TimeoutError | ConnectionError) or isinstance(e, CopgenError):
        return None
    who = _raised_by(e)
    if who in ("distributed", "dask", "dask_jobqueue", "dask_kubernetes"):
        return _infra(ClusterLostError, e, f"the Dask cluster did not answer: {type(e).__name__}: {e}")
    if who == "prefect":
        from copgen.flows.prefect_api import PrefectStartError

        return _infra(PrefectStartError, e, f"the Prefect API did not answer: {type(e).__name__}: {e}")
    return None


def classify(exc: BaseException) -> CopgenError | None:
    """``exc`` as a CopgenError (itself when it is one), or None when it is not a reportable failure."""
    if isinstance(exc, CopgenError) and exc.exit_code != 2:  # e.g. StorageUnavailableError itself
        return exc
    for e in _chain(exc):  # an unreachable service is infrastructure, whoever reported it
        name = _name(e)
        if name.endswith(("KilledWorker", "CommClosedError", "FutureCancelledError")) or (
                name.startswith("distributed.") and "Cancelled" in name):
            return _infra(ClusterLostError, exc, f"the Dask cluster lost the work: {type(e).__name__}: {e}")
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            return _infra(DiskFullError, exc, f"no space left on the output's filesystem{where}")
        elsewhere = _timeout_elsewhere(e)
        if elsewhere is not None:
            elsewhere.__cause__ = exc
            return elsewhere
        if unreachable(e) is e:
            return _infra(StorageUnavailableError, exc, f"storage unreachable: {type(e).__name__}: {e}")
    if isinstance(exc, CopgenError):
        return exc
    if isinstance(exc, ValueError | FileNotFoundError | PermissionError | IsADirectoryError
                  | NotADirectoryError):  # raised while checking options and local inputs
        return InputError(str(exc))
    return None


# A signal can arrive anywhere, also inside code that turns every exception into another one: pydantic-core,
# serialising Prefect's settings or a flow's parameters (``_ser_model``), makes a PydanticSerializationError
# (a ValueError, so "user input") that keeps only the signal exception's *name* in its message. Hence three
# witnesses, any one of which decides: the exception's type in the chain, its name in a wrapper's message,
# and a record, kept by the interpreter itself, of the signals this process received.
_TERMINATION = ("TerminationSignal", "_Terminated")  # Prefect's SIGTERM bridge, the CLI's own handler
_INTERRUPT = ("KeyboardInterrupt", "Abort")  # Ctrl-C, and click's wrapping of it
_received = bytearray()
_wakeup: tuple[int, int] | None = None


def record_signals() -> None:
    """Keep a record of the signals this process receives, whichever Python handler is installed at the
    time (Prefect swaps in its own SIGTERM handler during a flow run): the interpreter writes each signal's
    number to the wakeup fd before any handler runs. Main thread only; a no-op where that is impossible."""
    global _wakeup
    if _wakeup is not None:
        return
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    try:
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:  # not the main thread
        os.close(r)
        os.close(w)
        return
    _wakeup = (r, w)
    os.register_at_fork(after_in_child=_forget_signals)  # a forked child's signals are not ours


def _forget_signals() -> None:
    global _wakeup
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    _wakeup = None
    _received.clear()


def _received_signals() -> set[int]:
    if _wakeup is not None:
        while True:
            try:
                chunk = os.read(_wakeup[0], 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            _received.extend(chunk)
    return set(_received)


def signal_exit_code(exc: BaseException) -> int | None:
    """143 when the run ended because of SIGTERM, 130 for Ctrl-C (SIGINT), however the signal's exception
    was wrapped on its way out; None for any other failure. SIGTERM wins over SIGINT."""
    names = set()
    for e in _chain(exc):
        names.update(cls.__name__ for cls in type(e).__mro__)
        text = str(e)  # pydantic-core: "Error calling function `_ser_model`: TerminationSignal: ..."
        names.update(n for n in (*_TERMINATION, "KeyboardInterrupt") if f"{n}:" in text or text.endswith(n))
    received = _received_signals()
    if signal.SIGTERM in received or names.intersection(_TERMINATION):
        return EXIT_TERMINATED
    if signal.SIGINT in received or names.intersection(_INTERRUPT):
        return EXIT_INTERRUPTED
    return None
