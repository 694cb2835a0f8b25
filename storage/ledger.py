"""What is done: per-block completion markers, quarantine of bad samples, and the cube's writer lease.

Objects, all small JSON under ``<cube>/_ledger/`` (zarr ignores this prefix)::

    blocks/<block_id>.json     completion marker, written only after the block's data and ``done``
    quarantine/<key>.json      one bad (cell, patch, modality, file) with reason and traceback summary
    lease.json                 who may write this cube now (run id, host, pid, since, expiry)

Commit protocol of a block (DESIGN §3, pipeline-stack.md §5.3): data arrays -> ``done`` -> table parts
-> marker. Every step is an atomic object write that a re-run repeats with the same bytes, so a crash at
any point loses nothing: the block has no marker and is simply redone.

Lease policy: **fail fast**. A run that finds a live lease held by someone else gets ``LeaseHeldError``
naming the holder (run id, host, pid, since, expiry). A lease lives ``ttl_s`` seconds and the holder's
heartbeat thread renews it every ``ttl_s / 3``; a lease that was not renewed in time (crashed driver) is
taken over by the next run with a compare-and-swap, so exactly one of several racing runs wins. A holder
on this host whose process is gone (no such pid, or the pid now has another start time) is taken over at
once, with a warning saying so, instead of after the expiry. The lease
is taken by the driver (the only process that changes metadata); workers run under its authority.
Expiry uses wall-clock UTC time, so the hosts' clocks must agree to well within ``ttl_s``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from copgen.errors import CopgenError
from copgen.processes import is_gone, process_start
from copgen.storage.cubes import Cube, WorkBlock
from copgen.storage.objects import ConditionalStore, check_id, redact

log = logging.getLogger(__name__)

LEDGER_DIR = "_ledger"
LEASE_NAME = "lease.json"
# Marker fields that differ between two runs that wrote the same bytes (excluded from comparisons).
VOLATILE_MARKER_FIELDS = ("run_id", "host", "pid", "written_at")


class LedgerError(CopgenError):
    """A ledger operation failed; the message names the cube and the object."""


class LeaseHeldError(LedgerError):
    """Another live run holds the cube's lease."""

    def __init__(self, cube_url: str, holder: LeaseInfo) -> None:
        self.holder = holder
        super().__init__(
            f"cube {redact(cube_url)} is locked by run {holder.run_id!r} on host {holder.host!r} "
            f"(pid {holder.pid}) since {holder.acquired_at}, lease expires {_iso(holder.expires_at)} unless "
            f"renewed; wait for that run to finish, or for the lease to expire if it crashed"
        )


class LeaseLostError(LedgerError):
    """This run's lease expired or was taken over; it must stop writing."""


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1).encode()


@dataclass(frozen=True)
class LeaseInfo:
    """Content of ``lease.json``."""

    run_id: str
    host: str
    pid: int
    token: str
    acquired_at: str
    renewed_at: str
    expires_at: float
    ttl_s: float
    pid_start: str | None = None  # the holder process's start time (/proc), so a reused pid is not it

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def holder_gone(self) -> bool:
        """True when the holder ran on this host and its process no longer exists (or the pid now
        belongs to another process, told by its start time): its lease can be taken over at once."""
        return self.host == socket.gethostname() and is_gone(self.pid, self.pid_start)


@dataclass(frozen=True)
class QuarantineRecord:
    """One sample input that could not be used, and why."""

    grid_cell: str
    patch: str
    modality: str
    file: str
    reason: str
    traceback: str = ""
    run_id: str = ""
    block_id: str | None = None
    recorded_at: str = field(default_factory=_now_iso)
    dataset: str = ""
    field: str = ""
    # "block": found while a block read its inputs (the sample is in the cube, ``done`` 0);
    # "source": a metadata row the reader rejected (the cell's sample is held back from the cube).
    stage: str = "block"

    @property
    def key(self) -> str:
        """Deterministic object name: re-quarantining the same input overwrites one record."""
        ident = f"{self.grid_cell}|{self.patch}|{self.modality}|{self.file}"
        if self.stage != "block":
            ident += f"|{self.stage}|{self.field}"
        return hashlib.sha256(ident.encode()).hexdigest()[:24]


def summarise_exception(exc: BaseException, limit_chars: int = 2000) -> str:
    """The exception type, message and innermost frames, short enough to store per record."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-4))
    return text if len(text) <= limit_chars else "..." + text[-limit_chars:]


class Ledger:
    """The ledger of one cube. Picklable; works on local disk and S3 (see ``copgen.storage.objects``)."""

    def __init__(self, cube_url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.cube_url = cube_url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._store: ConditionalStore | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    @property
    def store(self) -> ConditionalStore:
        if self._store is None:
            self._store = ConditionalStore(f"{self.cube_url}/{LEDGER_DIR}", self.storage_options)
        return self._store

    # -- block markers ---------------------------------------------------------------------------
    @staticmethod
    def _marker_name(block: WorkBlock) -> str:
        WorkBlock.parse(block.id)  # the id becomes an object name: it must round-trip
        return f"blocks/{block.id}.json"

    def mark_done(
        self,
        block: WorkBlock,
        run_id: str,
        digests: Mapping[str, str],
        n_done: int,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the completion marker of ``block``. Call it only after the block's arrays, its
        ``done`` flags and its table parts are written. ``digests``: what ``Cube.write_block`` returned."""
        check_id(run_id, "run id")
        marker = {
            "schema": 1,
            "block": block.id,
            "start": block.start,
            "stop": block.stop,
            "n_done": int(n_done),
            "n_quarantined": block.size - int(n_done),
            "arrays": dict(sorted(digests.items())),
            "extra": dict(extra or {}),
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "written_at": _now_iso(),
        }
        self.store.put(self._marker_name(block), _dumps(marker))

    def marker(self, block: WorkBlock) -> dict[str, Any] | None:
        """The block's marker, or None if absent or unreadable (an unreadable marker means: redo)."""
        got = self.store.read(self._marker_name(block))
        if got is None:
            return None
        try:
            marker = json.loads(got[0])
        except ValueError:
            log.warning("unreadable marker %s in %s: block will be redone", block.id, redact(self.cube_url))
            return None
        if not isinstance(marker, dict) or marker.get("block") != block.id:
            return None
        return marker

    def done_block_ids(self) -> set[str]:
        """Ids of all blocks with a marker (one listing; markers are only written when complete)."""
        ids = set()
        for name in self.store.list("blocks"):
            stem = name.rsplit("/", 1)[-1]
            if stem.endswith(".json"):
                with contextlib.suppress(ValueError):
                    ids.add(WorkBlock.parse(stem[: -len(".json")]).id)
        return ids

    def pending_blocks(self, cube: Cube, check_done_flags: bool = True) -> list[WorkBlock]:
        """Blocks of ``cube`` still to do: no marker, or (with ``check_done_flags``) a marker whose
        ``n_done`` disagrees with the cube's ``done`` flags (markers come after data, so that means
        the data was lost or rewritten since)."""
        marked = self.done_block_ids()
        pending = [b for b in cube.blocks() if b.id not in marked]
        if check_done_flags and marked:
            done = cube.done_mask()
            for b in cube.blocks():
                if b.id not in marked:
                    continue
                m = self.marker(b)
                if m is None or int(done[b.start:b.stop].sum()) != m["n_done"]:
                    pending.append(b)
        return sorted(pending)

    def pending_samples(self, cube: Cube, include_quarantined: bool = False) -> np.ndarray:
        """Indices of samples whose ``done`` flag is not set, minus quarantined (cell, patch) pairs."""
        idx = np.flatnonzero(~cube.done_mask() & cube.batch_mask())  # padding between batches is no sample
        if include_quarantined or idx.size == 0:
            return idx
        bad = {(q.grid_cell, q.patch) for q in self.quarantined()}
        if not bad:
            return idx
        cells = cube.group["grid_cell"][:]
        patches = cube.group["patch"][:]
        return np.array([i for i in idx if (str(cells[i]), str(patches[i])) not in bad], dtype=np.int64)

    # -- quarantine ------------------------------------------------------------------------------
    def quarantine(self, record: QuarantineRecord) -> None:
        """Record a bad input; re-recording the same (cell, patch, modality, file) replaces it."""
        self.store.put(f"quarantine/{record.key}.json", _dumps(asdict(record)))

    def forget_quarantine(self, record: QuarantineRecord) -> bool:
        """Delete one quarantine record (its input was fixed, or it is being retried)."""
        name = f"quarantine/{record.key}.json"
        got = self.store.read(name)
        return got is not None and self.store.delete(name, got[1])

    def reopen_quarantined_blocks(self, cube: Cube) -> list[WorkBlock]:
        """``--retry-quarantined``: forget the block-stage records and the markers of every block that
        quarantined samples, so the next dispatch re-reads them (driver, under the lease). The block's good
        samples are recomputed with the same seeds, i.e. rewritten with the same bytes."""
        reopened = []
        records = [q for q in self.quarantined() if q.stage == "block" and q.block_id]
        for b in cube.blocks():
            m = self.marker(b)
            if m is None or not m.get("n_quarantined"):
                continue
            for q in records:
                if q.block_id == b.id:
                    self.forget_quarantine(q)
            got = self.store.read(self._marker_name(b))
            if got is not None:
                self.store.delete(self._marker_name(b), got[1])
            reopened.append(b)
        return reopened

    def quarantined(self) -> list[QuarantineRecord]:
        """All quarantine records, sorted by (grid_cell, patch, modality)."""
        out = []
        for name in self.store.list("quarantine"):
            got = self.store.read(name)
            if got is None or not name.endswith(".json"):
                continue
            try:
                out.append(QuarantineRecord(**json.loads(got[0])))
            except (ValueError, TypeError) as e:
                raise LedgerError(
                    f"unreadable quarantine record {name} in {redact(self.cube_url)}: {e}") from e
        return sorted(out, key=lambda q: (q.grid_cell, q.patch, q.modality, q.file))

    # -- lease -----------------------------------------------------------------------------------
    def lease_holder(self) -> LeaseInfo | None:
        """The current lease (live or expired), or None."""
        got = self.store.read(LEASE_NAME)
        return None if got is None else _parse_lease(got[0])

    def acquire_lease(
        self, run_id: str, ttl_s: float = 120.0, heartbeat: bool = True
    ) -> Lease:
        """Take the cube's writer lease for ``run_id`` or raise ``LeaseHeldError`` (policy: fail fast).
        An expired lease is taken over. With ``heartbeat`` a daemon thread renews it every ttl/3."""
        check_id(run_id, "run id")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        store = self.store
        for _ in range(5):
            info = _new_lease(run_id, ttl_s)
            data = _dumps(asdict(info))
            if store.create(LEASE_NAME, data):
                return Lease(self, info, store.read(LEASE_NAME)[1], heartbeat)
            got = store.read(LEASE_NAME)
            if got is None:
                continue  # released between our two calls: try to create again
            held, tag = _parse_lease(got[0]), got[1]
            gone = held is not None and not held.expired() and held.holder_gone()
            if held is not None and not held.expired() and not gone:
                raise LeaseHeldError(self.cube_url, held)
            if store.replace(LEASE_NAME, data, tag):
                why = (f"its holder, run {held.run_id!r} (pid {held.pid} on this host), is gone" if gone
                       else f"the lease of run {getattr(held, 'run_id', '?')!r} expired")
                log.warning("took over the lease of %s: %s", redact(self.cube_url), why)
                return Lease(self, info, store.read(LEASE_NAME)[1], heartbeat)
        raise LedgerError(f"could not take the lease of {redact(self.cube_url)}: heavy contention")


def _new_lease(run_id: str, ttl_s: float) -> LeaseInfo:
    now = time.time()
    return LeaseInfo(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex,
                     acquired_at=_iso(now), renewed_at=_iso(now), expires_at=now + ttl_s, ttl_s=ttl_s,
                     pid_start=process_start(os.getpid()))


def _parse_lease(data: bytes) -> LeaseInfo | None:
    """None for a lease object that cannot be read: it is treated as expired (and taken over)."""
    try:
        return LeaseInfo(**json.loads(data))
    except (ValueError, TypeError):
        return None


class Lease:
    """A held writer lease. Use as a context manager; ``check()`` before committing work."""

    def __init__(self, ledger: Ledger, info: LeaseInfo, tag: str, heartbeat: bool) -> None:
        self.ledger = ledger
        self.info = info
        self._tag = tag
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, name=f"lease-{info.run_id}", daemon=True)
            self._thread.start()

    def renew(self) -> None:
        """Extend the lease by ``ttl_s`` (compare-and-swap on the version we wrote)."""
        with self._lock:
            self._raise_if_lost()
            now = time.time()
            if self.info.expired(now):
                self._lost = f"lease of run {self.info.run_id!r} expired at {_iso(self.info.expires_at)}"
                self._raise_if_lost()
            fields = {**asdict(self.info), "renewed_at": _iso(now), "expires_at": now + self.info.ttl_s}
            info = LeaseInfo(**fields)
            store = self.ledger.store
            if not store.replace(LEASE_NAME, _dumps(asdict(info)), self._tag):
                self._lost = f"lease of run {self.info.run_id!r} was taken over: {self.ledger.lease_holder()}"
                self._raise_if_lost()
            got = store.read(LEASE_NAME)
            if got is None:
                self._lost = f"lease of run {self.info.run_id!r} was deleted"
                self._raise_if_lost()
            self.info, self._tag = info, got[1]

    def check(self) -> None:
        """Raise ``LeaseLostError`` if the lease is no longer ours (call before a commit)."""
        with self._lock:
            if self._lost is None and self.info.expired():
                self._lost = f"lease of run {self.info.run_id!r} expired at {_iso(self.info.expires_at)}"
            self._raise_if_lost()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._lost is None and not self.ledger.store.delete(LEASE_NAME, self._tag):
                log.warning("lease of %s was no longer ours at release", self.info.run_id)
            self._lost = self._lost or "released"

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            raise LeaseLostError(f"{self._lost} (cube {redact(self.ledger.cube_url)})")

    def _beat(self) -> None:
        while not self._stop.wait(self.info.ttl_s / 3):
            try:
                self.renew()
            except LeaseLostError as e:
                log.error("%s", e)
                return
            except Exception as e:  # transient storage error: try again next beat, until expiry
                log.warning("lease renewal failed (will retry): %s", e)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def strip_volatile(marker: Mapping[str, Any]) -> dict[str, Any]:
    """A marker without the fields that name the run and time (for comparing two runs' ledgers)."""
    return {k: v for k, v in marker.items() if k not in VOLATILE_MARKER_FIELDS}
