"""Whole-object writes for a cube's work blocks: the bytes zarr-python writes, without its per-chunk cost.

zarr-python's ``array[a:b] = values`` runs an async codec pipeline per inner chunk (~8 ms per 196 KB tile
here, 0.05x a plain file write of the same bytes, benchmarks/cube_write.py). A work block always covers
whole chunks/shards (``Cube.check_block``), so nothing has to be read back or merged: each object is
encoded from the block's arrays in one pass and written in one call, a pool of threads writing objects
(and hashing arrays for the ledger marker) concurrently.

The format is zarr v3's, byte for byte what zarr-python writes for the same values (pinned by
tests/storage/test_chunkwrite.py): inner chunks through the array's own codecs (``bytes`` then an
optional ``zstd``), all-fill inner chunks left out, inner chunks in Morton order, the shard index
(offset, length as little-endian uint64, empty = 2^64-1) plus its crc32c at the end, an object whose
chunks are all empty deleted. Local files are written atomically (temporary name, then rename), as
zarr's LocalStore does. Any array whose metadata is outside this (another codec, index at the start,
another store) is written through zarr-python instead, so correctness never depends on this path.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import fsspec
import google_crc32c
import numcodecs
import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.storage import FsspecStore, LocalStore

try:  # zarr-python's own order of inner chunks in a shard (a private helper: fall back to C order)
    from zarr.core.indexing import morton_order_iter as _chunk_order
except ImportError:  # pragma: no cover - depends on the zarr version
    def _chunk_order(shape: tuple[int, ...]) -> Iterable[tuple[int, ...]]:
        return product(*(range(s) for s in shape))

_EMPTY = np.uint64(2**64 - 1)
#: threads writing objects and hashing arrays: writes are syscalls and hashlib/zstd release the GIL
WRITE_THREADS = 4


class Unsupported(Exception):
    """An array whose encoding this module does not reproduce: write it through zarr-python."""


Buffers = list[memoryview | bytes]


def _bytes_codecs(codecs: tuple, dtype: np.dtype) -> Callable[[np.ndarray], Buffers]:
    """``bytes`` [+ ``zstd``] -> a function from one C-ordered chunk to its encoded buffers."""
    if not codecs or not isinstance(codecs[0], BytesCodec):
        raise Unsupported(f"codecs {codecs}")
    endian = codecs[0].endian
    order = "<" if endian is None or endian.value == "little" else ">"
    target = dtype.newbyteorder(order) if dtype.itemsize > 1 else dtype
    rest = codecs[1:]
    if not rest:
        def raw(chunk: np.ndarray) -> Buffers:
            c = np.ascontiguousarray(chunk, dtype=target)
            return [memoryview(c).cast("B")]
        return raw
    if len(rest) == 1 and isinstance(rest[0], ZstdCodec):
        zstd = numcodecs.Zstd(level=rest[0].level, checksum=rest[0].checksum)  # what ZstdCodec runs

        def compressed(chunk: np.ndarray) -> Buffers:
            return [zstd.encode(np.ascontiguousarray(chunk, dtype=target).tobytes())]
        return compressed
    raise Unsupported(f"codecs {codecs}")


def _nbytes(bufs: Buffers) -> int:
    return sum(len(b) if isinstance(b, bytes) else b.nbytes for b in bufs)


@dataclass
class _Encoder:
    """How one array's objects are built: chunk grid, optional shard layout, codecs, fill value."""

    name: str
    shape: tuple[int, ...]
    object_shape: tuple[int, ...]  # the shard shape, or the chunk shape of an unsharded array
    inner_shape: tuple[int, ...] | None  # inner chunk shape of a shard
    encode_inner: Callable[[np.ndarray], Buffers]
    fill: Any
    dtype: np.dtype
    write_empty: bool
    key: Callable[[tuple[int, ...]], str]

    @classmethod
    def of(cls, array: Any) -> _Encoder:
        meta = array.metadata
        if getattr(meta, "zarr_format", 3) != 3 or array.order != "C":
            raise Unsupported("not a C-ordered zarr v3 array")
        dtype = np.dtype(array.dtype)
        if dtype.kind not in "biuf":
            raise Unsupported(f"dtype {dtype}")
        codecs = tuple(meta.codecs)
        object_shape = tuple(meta.chunk_grid.chunk_shape)
        inner_shape = None
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sharding = codecs[0]
            idx = tuple(sharding.index_codecs)
            if (sharding.index_location != ShardingCodecIndexLocation.end or len(idx) != 2
                    or not isinstance(idx[0], BytesCodec) or idx[0].endian is None
                    or idx[0].endian.value != "little" or not isinstance(idx[1], Crc32cCodec)):
                raise Unsupported(f"shard index {sharding}")
            inner_shape = tuple(sharding.chunk_shape)
            if any(o % i for o, i in zip(object_shape, inner_shape, strict=True)):
                raise Unsupported("shard shape is not a multiple of the inner chunk shape")
            codecs = tuple(sharding.codecs)
        return cls(
            name=array.path, shape=tuple(array.shape), object_shape=object_shape, inner_shape=inner_shape,
            encode_inner=_bytes_codecs(codecs, dtype), fill=np.asarray(meta.fill_value, dtype=dtype),
            dtype=dtype, write_empty=bool(array.config.write_empty_chunks), key=meta.encode_chunk_key,
        )

    def _empty(self, chunk: np.ndarray) -> bool:
        # zarr's test: every value equals the fill value (so -0.0 counts as empty for a 0.0 fill, as there)
        return not self.write_empty and bool(np.all(chunk == self.fill))

    def objects(self, start: int, values: np.ndarray) -> Iterable[tuple[str, np.ndarray]]:
        """``(chunk key, object's values)`` for the rows ``start:start+len(values)``, which must cover
        whole objects (the array's last object may be partial: padded with the fill value, as zarr does).
        ``encode`` turns the values into the object's bytes."""
        n, rows = len(values), self.object_shape[0]
        stop = start + n
        if start % rows or (stop % rows and stop != self.shape[0]) or values.shape[1:] != self.shape[1:]:
            raise Unsupported(f"region [{start}, {stop}) of {self.name} does not cover whole objects")
        if values.dtype != self.dtype:
            raise Unsupported(f"{values.dtype} values for a {self.dtype} array")
        grid = [range(start // rows, -(-stop // rows))]
        grid += [range(-(-s // c)) for s, c in zip(self.shape[1:], self.object_shape[1:], strict=True)]
        for coords in product(*grid):
            lo = [c * s for c, s in zip(coords, self.object_shape, strict=True)]
            lo[0] -= start
            part = values[tuple(slice(a, a + s) for a, s in zip(lo, self.object_shape, strict=True))]
            if part.shape != self.object_shape:  # an edge object: zarr pads it with the fill value
                full = np.full(self.object_shape, self.fill, dtype=self.dtype)
                full[tuple(slice(0, s) for s in part.shape)] = part
                part = full
            yield self.key(coords), part

    def encode(self, part: np.ndarray) -> Buffers | None:
        """The object's buffers, or None: every chunk is empty (the object is deleted, as zarr does)."""
        return self._shard(part) if self.inner_shape else self._chunk(part)

    def _chunk(self, chunk: np.ndarray) -> Buffers | None:
        return None if self._empty(chunk) else self.encode_inner(chunk)

    def _shard(self, shard: np.ndarray) -> Buffers | None:
        inner = self.inner_shape
        per_shard = tuple(o // i for o, i in zip(self.object_shape, inner, strict=True))
        index = np.full((*per_shard, 2), _EMPTY, dtype="<u8")
        out: Buffers = []
        offset = 0
        for coords in _chunk_order(per_shard):
            chunk = shard[tuple(slice(c * i, (c + 1) * i) for c, i in zip(coords, inner, strict=True))]
            if self._empty(chunk):
                continue
            bufs = self.encode_inner(chunk)
            size = _nbytes(bufs)
            index[coords] = (offset, size)
            offset += size
            out += bufs
        if not out:
            return None
        raw = index.tobytes()
        out += [raw, np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()]
        return out


class _Target:
    """Where objects go: a local directory (atomic file writes) or an fsspec filesystem (one batch call)."""

    def __init__(self, store: Any, url: str, storage_options: Mapping[str, Any] | None) -> None:
        if isinstance(store, LocalStore):
            self.root, self.fs = str(store.root), None
        elif isinstance(store, FsspecStore):
            so = dict(storage_options or {}) if "://" in url else {}
            self.fs, self.root = fsspec.core.url_to_fs(url, **so)
            self.root = self.root.rstrip("/")
        else:
            raise Unsupported(f"store {type(store).__name__}")

    def path(self, array: str, key: str) -> str:
        return f"{self.root}/{array}/{key}"

    def write(self, pool: ThreadPoolExecutor, encoder: _Encoder, objects: Mapping[str, np.ndarray]
              ) -> list[Future]:
        """Encode and store every object on the pool; the futures finish when all are stored."""
        if self.fs is None:
            return [pool.submit(_local_store, path, encoder, part) for path, part in objects.items()]
        paths = list(objects)
        encoded = dict(zip(paths, pool.map(encoder.encode, objects.values()), strict=True))
        puts = {p: b"".join(bufs) for p, bufs in encoded.items() if bufs is not None}
        deletes = [p for p, bufs in encoded.items() if bufs is None]
        futures = [pool.submit(self.fs.pipe, puts)] if puts else []
        if deletes:
            futures.append(pool.submit(self._remote_delete, deletes))
        return futures

    def _remote_delete(self, paths: list[str]) -> None:
        present = [p for p in paths if self.fs.exists(p)]
        if present:
            self.fs.rm(present)


def _local_store(path: str, encoder: _Encoder, part: np.ndarray) -> None:
    bufs = encoder.encode(part)
    if bufs is None:
        Path(path).unlink(missing_ok=True)
        return
    target = Path(path)
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
    try:
        f = tmp.open("wb")
    except FileNotFoundError:
        target.parent.mkdir(parents=True, exist_ok=True)
        f = tmp.open("wb")
    try:
        with f:
            for b in bufs:
                f.write(b)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="copgen-cube-write")
    return _POOL


def submit(fn: Callable[..., Any], *args: Any) -> Future:
    """Run ``fn`` on the writer's pool (e.g. hashing a block while its objects are written)."""
    return _pool().submit(fn, *args)


def write_region(
    group: Any, url: str, storage_options: Mapping[str, Any] | None, start: int,
    arrays: Mapping[str, np.ndarray], last: Iterable[str] = (),
) -> None:
    """Write ``arrays[name]`` into rows ``start:start+n`` of each array of ``group``; the arrays named in
    ``last`` only after every other object is stored. Returns once every object is stored."""
    pool = _pool()
    last = set(last)
    try:
        target = _Target(group.store, url, storage_options)
    except Unsupported:
        target = None
    for phase in ([n for n in arrays if n not in last], [n for n in arrays if n in last]):
        futures: list[Future] = []
        for name in phase:
            array = group[name]
            try:
                if target is None:
                    raise Unsupported("store")
                encoder = _Encoder.of(array)
                objects = {target.path(name, key): part for key, part in encoder.objects(start, arrays[name])}
            except Unsupported:
                array[start:start + len(arrays[name])] = arrays[name]  # zarr-python's own path
                continue
            futures += target.write(pool, encoder, objects)
        for f in futures:  # every object of this phase is stored before the next phase starts
            f.result()
