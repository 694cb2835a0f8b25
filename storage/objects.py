"""Small JSON objects with compare-and-swap semantics on local disk and S3, and identifier checks.

The ledger needs three atomic primitives that plain fsspec does not offer: create-if-absent, replace
only if unchanged since read, delete only if unchanged. They are built on

- S3 (s3fs): conditional requests. ``PutObject`` with ``If-None-Match: *`` (create) or ``If-Match:
  <etag>`` (replace), ``DeleteObject`` with ``If-Match``. AWS S3 supports these since 2024; moto 5
  implements all three (checked against moto 5.2.1). A failed precondition is HTTP 412, which s3fs
  turns into ``FileExistsError``/``OSError``; because a retried request can also see a 412 for its own
  earlier success, every failure is verified by reading the object back (create-then-verify). Transient
  failures are retried by storage/retry.py; once those retries are spent (``StorageUnavailableError``)
  nothing is read back: the store is down and the caller stops (exit 4).
- local disk: ``os.link`` of a fully written temporary file (atomic and exclusive on POSIX) for create;
  replace/delete hold an ``fcntl.flock`` on a sidecar ``<name>.lock`` while they compare and rename.
  The tag of a local object is the sha256 of its bytes (the content always holds a unique token).

Other filesystems are refused with a clear error rather than given a lock that is not one.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from copgen.errors import StorageUnavailableError

# One definition of a safe id, a redacted URL and a joined URL, shared with the readers and writers.
from copgen.storage.fsutil import StorageIdError, check_id
from copgen.storage.fsutil import join_url as join
from copgen.storage.fsutil import redact_url as redact
from fsspec.implementations.local import LocalFileSystem

__all__ = ["ConditionalStore", "StorageIdError", "check_id", "join", "redact"]


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class ConditionalStore:
    """Atomic create / compare-and-swap / conditional delete of small objects under one URL prefix."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        self._s3 = "s3" in _protocols(self.fs)  # s3fs, or copgen's retrying subclass of it
        self._local = isinstance(self.fs, LocalFileSystem)
        if not (self._s3 or self._local):
            raise NotImplementedError(
                f"conditional writes (leases) need local disk or S3; {redact(url)} uses "
                f"{type(self.fs).__name__}"
            )

    # -- paths -----------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    # -- primitives ------------------------------------------------------------------------------
    def put(self, name: str, data: bytes) -> None:
        """Unconditional atomic write (a reader sees the old or the new object, never a torn one).
        For objects with one writer (markers, quarantine records): on local disk it also removes the
        temporary files a crashed earlier write of ``name`` left behind."""
        if self._local:
            for stale in glob.glob(glob.escape(self.path(name)) + ".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
            self._local_write(name, data)
        else:
            self.fs.pipe_file(self.path(name), data)

    def list(self, prefix: str) -> list[str]:
        """Names of the objects directly under ``prefix`` (relative to the store), sorted."""
        path = self.path(prefix)
        self.fs.invalidate_cache(path)  # s3fs caches listings; the ledger must see other writers
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(f"{prefix}/{e.rstrip('/').rsplit('/', 1)[-1]}" for e in entries)

    def read(self, name: str) -> tuple[bytes, str] | None:
        """``(content, tag)`` of object ``name``, or None when it does not exist."""
        if self._local:
            try:
                with open(self.path(name), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            return data, hashlib.sha256(data).hexdigest()
        return self._s3_get(name)

    def create(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist; True when this call created it."""
        if self._local:
            return self._local_create(name, data)
        bucket, key = self._bucket_key(name)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except StorageUnavailableError:
            raise  # already retried to the end (storage/retry.py): the store is down, not the object taken
        except OSError:
            # 412, or a retry that collided with its own first attempt: the content decides.
            current = self._s3_get(name)
            if current is None:
                raise
            return current[0] == data

    def replace(self, name: str, data: bytes, tag: str) -> bool:
        """Overwrite ``name`` only if its tag is still ``tag``; True when this call replaced it."""
        if self._local:
            with self._flock(name):
                current = self.read(name)
                if current is None or current[1] != tag:
                    return False
                self._local_write(name, data)
                return True
        bucket, key = self._bucket_key(name)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=tag)
            return True
        except StorageUnavailableError:
            raise
        except (OSError, FileNotFoundError):
            current = self._s3_get(name)
            if current is not None and current[0] == data:
                return True
            if current is None or current[1] != tag:
                return False
            raise

    def delete(self, name: str, tag: str) -> bool:
        """Delete ``name`` only if its tag is still ``tag``; True when this call deleted it."""
        if self._local:
            with self._flock(name):
                current = self.read(name)
                if current is None or current[1] != tag:
                    return False
                os.unlink(self.path(name))
                return True
        bucket, key = self._bucket_key(name)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=tag)
            return True
        except StorageUnavailableError:
            raise
        except (OSError, FileNotFoundError):
            current = self._s3_get(name)
            if current is None or current[1] != tag:
                return False
            raise

    # -- local helpers ---------------------------------------------------------------------------
    def _local_write(self, name: str, data: bytes) -> None:
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _local_create(self, name: str, data: bytes) -> bool:
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            with self._flock(name):
                os.link(tmp, path)  # fails with FileExistsError if present: exclusive and atomic
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    @contextlib.contextmanager
    def _flock(self, name: str) -> Iterator[None]:
        lock_path = self.path(name) + ".lock"
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- S3 helpers ------------------------------------------------------------------------------
    def _bucket_key(self, name: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self.path(name))
        return bucket, key

    def _s3_get(self, name: str) -> tuple[bytes, str] | None:
        """Body and ETag from one GetObject, so the tag is the tag of exactly these bytes."""
        from fsspec.asyn import sync

        bucket, key = self._bucket_key(name)

        async def _get() -> tuple[bytes, str] | None:
            try:
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None
            async with resp["Body"] as body:
                data = await body.read()
            return data, resp["ETag"]

        return sync(self.fs.loop, _get)
