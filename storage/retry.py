"""The one retry policy for object storage: bounded, with capped exponential backoff and jitter, visible.

Transient failures of S3 (connection refused or reset, timeouts, HTTP 5xx, throttling such as ``SlowDown``)
are retried up to ``attempts`` times; before each new try one line goes to stderr::

    waiting for s3://bucket/key (attempt 3/8): connection refused; next try in 2.1 s

After the last attempt the call raises :class:`~copgen.errors.StorageUnavailableError` (the CLI's exit 4,
one line and a hint). Permanent answers (403, 404, ``NoSuchBucket``, bad credentials, a failed
precondition) are never retried: they come back at once, as s3fs translates them (``PermissionError``,
``FileNotFoundError``, ...).

Where it hooks in. s3fs routes every S3 request, and the body reads that follow a ``GetObject``, through
one module function, ``s3fs.core._error_wrapper`` (its own retries there are silent, unjittered and not
configurable), and botocore retries again underneath (silently, up to 5 attempts). So:

- :class:`RetryingS3FileSystem` (registered for ``s3://`` and ``s3a://`` by ``copgen.storage``'s import,
  lazily, so every ``fsspec.url_to_fs`` and Zarr store in our processes gets it) turns botocore's
  retries off (one attempt per call) and takes its connect and read timeouts from the policy, unless
  the user's ``config_kwargs`` set them;
- :func:`_error_wrapper` replaces s3fs's: it classifies, waits, prints and gives up by this policy. A
  wrapper nested in another (s3fs reads a body inside a wrapped closure) makes one attempt and lets the
  outer loop retry, so attempts never multiply. (One s3fs path keeps its own loop: ``fs.get``'s download
  retries a body cut mid-way silently, a few times; its requests still go through this policy.)
- uploads drop ``Expect: 100-continue``: aiohttp waits for the "100 Continue" without any timeout, so a
  paused server held every write forever, silently.

Importing this module installs the wrapper. Worker processes import it when they unpickle a filesystem
(its class lives here) or open an ``s3://`` URL (the registration), so they retry by the same rules; a
local cluster's workers write to the driver's stderr, so the lines reach the user's terminal (a remote
cluster's workers: their logs). The policy comes from the environment of each process (attempts and waits
read at every call, timeouts when a filesystem is made); workers of an external cluster need the same
variables (a local cluster's inherit them):

    COPGEN_STORAGE_RETRIES      attempts per request, default 8 (1 = no retry)
    COPGEN_STORAGE_BACKOFF      first wait in seconds, default 0.5; doubles each time, with jitter
    COPGEN_STORAGE_BACKOFF_MAX  longest wait in seconds, default 30
    COPGEN_STORAGE_TIMEOUT      read timeout of one request in seconds, default 15 (a stalled server
                                counts as a failed attempt after this long); connect timeout min(5, it)
"""

from __future__ import annotations

import asyncio
import contextvars
import errno as _errno
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import botocore.exceptions
import s3fs
import s3fs.core
from copgen.errors import _NET_ERRNOS, CopgenError, StorageUnavailableError, redact_url
from s3fs.errors import translate_boto_error

log = logging.getLogger("copgen.storage")

ENV = {"attempts": "COPGEN_STORAGE_RETRIES", "backoff": "COPGEN_STORAGE_BACKOFF",
       "backoff_max": "COPGEN_STORAGE_BACKOFF_MAX", "timeout": "COPGEN_STORAGE_TIMEOUT"}

# Error codes an S3 service uses for "try again later" (besides any HTTP 5xx and 429).
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "PriorRequestNotComplete",
    "ConditionalRequestConflict",  # 409: another conditional write to the key is in flight; AWS says retry
    "XAmzContentSHA256Mismatch",  # a body damaged in transit; s3fs retries it too
})


# No answer, or a cut one: the connection failed, timed out or broke (botocore's connection errors and
# timeouts, aiohttp's, the builtins), plus what s3fs itself retries (a cut body, a throttling reply that
# is not XML). Not the configuration errors that share words with them (EndpointResolutionError, ...).
_TRANSIENT_TYPES = (*s3fs.core.S3_RETRYABLE_ERRORS, botocore.exceptions.ConnectionError,
                    aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError, TimeoutError)
# A certificate that does not verify will not verify later; a give-up from a call inside is final.
_PERMANENT = (botocore.exceptions.SSLError, StorageUnavailableError)


def _net_errno(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _NET_ERRNOS


class RetryConfigError(CopgenError, ValueError):
    """A ``COPGEN_STORAGE_*`` variable that is not a valid number."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    backoff: float = 0.5
    backoff_max: float = 30.0
    timeout: float = 15.0

    @property
    def connect_timeout(self) -> float:
        return min(5.0, self.timeout)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RetryPolicy:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field, var in ENV.items():
            text = env.get(var, "").strip()
            if not text:
                continue
            try:
                value = int(text) if field == "attempts" else float(text)
            except ValueError:
                value = None
            if value is None or value != value or (value < 1 if field == "attempts" else value < 0) or (
                    field == "timeout" and value <= 0):
                raise RetryConfigError(f"{var}={text!r}: expected "
                                       + ("a whole number >= 1" if field == "attempts"
                                          else "a number of seconds >= 0" if field != "timeout"
                                          else "a number of seconds > 0"))
            values[field] = value
        return cls(**values)

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed ``attempt`` (1-based): capped doubling, the upper half jittered
        so that many clients hitting one outage do not retry in lockstep."""
        full = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
        return full / 2 + rng() * full / 2


def transient(exc: BaseException) -> str | None:
    """A short reason when ``exc`` is worth another try (the service may answer later), else None."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore ClientError: the server answered
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            code = "" if code == str(status) else code  # a HEAD's error has no body: the code is the status
            return f"HTTP {status} {code}".strip() if status else code
        return None
    if isinstance(exc, _PERMANENT) or not isinstance(exc, _TRANSIENT_TYPES) and not _net_errno(exc):
        return None
    return _short(exc)


def _short(exc: BaseException) -> str:
    """A short, credential-free reason: the class and the errno text, never the message (it may hold URLs)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _errno.errorcode and e.errno:
            return os.strerror(e.errno).lower()
        e = e.__cause__ or e.__context__ or getattr(e, "os_error", None)
    name = type(exc).__name__
    return "timed out" if "Timeout" in name or isinstance(exc, TimeoutError) else name


def report(line: str) -> None:
    """Where the waiting lines go: stderr of this process (a local cluster's workers share the driver's)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    log.debug("%s", line)


class _Call:
    """State of one retried call, seen by the calls nested inside it."""

    def __init__(self, where: str | None) -> None:
        self.where = where


_ACTIVE: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("copgen_storage_retry", default=None)


def _where(kwargs: Mapping[str, Any]) -> str | None:
    bucket, key = kwargs.get("Bucket"), kwargs.get("Key")
    if not bucket:
        return None
    return redact_url(f"s3://{bucket}/{key}" if key else f"s3://{bucket}")


async def _error_wrapper(func, *, args=(), kwargs=None, retries=None):
    """Drop-in for ``s3fs.core._error_wrapper`` (same signature; ``retries`` is s3fs's and is ignored):
    call ``func`` under :class:`RetryPolicy` from the environment."""
    kwargs = kwargs or {}
    where = _where(kwargs)
    outer = _ACTIVE.get()
    if outer is not None:  # inside a retried call: one attempt, raw errors, the outer loop decides
        if outer.where is None:
            outer.where = where
        return await func(*args, **kwargs)
    policy = RetryPolicy.from_env()
    call = _Call(where)
    token = _ACTIVE.set(call)
    t0 = time.monotonic()
    try:
        for attempt in range(1, policy.attempts + 1):
            try:
                return await func(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below; anything permanent is re-raised
                reason = transient(exc)
                if reason is None and _s3fs_custom_retry(exc):
                    reason = type(exc).__name__
                if reason is None:
                    translated = translate_boto_error(exc)  # 404 -> FileNotFoundError, 403 -> PermissionError
                    if translated is exc:
                        raise
                    raise translated from exc
                name = call.where or "s3 storage"
                if attempt == policy.attempts:
                    raise StorageUnavailableError(
                        f"storage unreachable: {name}: gave up after {policy.attempts} attempt(s) in "
                        f"{time.monotonic() - t0:.0f} s ({reason})") from exc
                wait = policy.delay(attempt)
                report(f"waiting for {name} (attempt {attempt}/{policy.attempts}): {reason}; "
                       f"next try in {wait:.1f} s")
                await asyncio.sleep(wait)
    finally:
        _ACTIVE.reset(token)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _s3fs_custom_retry(exc: BaseException) -> bool:
    """Honour a handler installed with ``s3fs.core.set_custom_error_handler`` (the user's own rule)."""
    try:
        return bool(s3fs.core.CUSTOM_ERROR_HANDLER(exc))
    except Exception:  # noqa: BLE001 - a broken handler must not hide the real error
        return False


def _install() -> None:
    """Route s3fs's request wrapper through this policy (once per process: on this module's import)."""
    if getattr(s3fs.core, "_error_wrapper", None) is None:  # a newer s3fs without the hook: say so loudly
        raise ImportError("s3fs.core._error_wrapper is gone: copgen's storage retry policy needs updating "
                          f"for s3fs {getattr(s3fs, '__version__', '?')}")
    s3fs.core._error_wrapper = _error_wrapper


_install()


def _no_expect_continue(request: Any, **_: Any) -> None:
    """Send uploads without ``Expect: 100-continue``: aiohttp waits for the "100 Continue" with no timeout,
    so a stalled server held every write forever and silently (the read timeout never started). Without
    it the body goes out at once and the reply is awaited under the read timeout, as for reads. (The header
    is not signed; it only saves sending a body that the server would refuse.)"""
    request.headers.pop("Expect", None)


class RetryingS3FileSystem(s3fs.S3FileSystem):
    """s3fs with botocore's own retries off and the policy's timeouts (unless ``config_kwargs`` sets them)."""

    def __init__(self, *args: Any, config_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        policy = RetryPolicy.from_env()
        config = {"connect_timeout": policy.connect_timeout, "read_timeout": policy.timeout,
                  "retries": {"total_max_attempts": 1, "mode": "standard"}, **dict(config_kwargs or {})}
        super().__init__(*args, config_kwargs=config, **kwargs)

    async def set_session(self, refresh: bool = False, kwargs: Mapping[str, Any] | None = None):
        client = await super().set_session(refresh=refresh, kwargs=kwargs or {})
        client.meta.events.register("before-send.s3", _no_expect_continue, unique_id="copgen-no-expect-100")
        return client
