"""Fail fast: check a run's arguments, source, checkpoints and output before Prefect or Dask start.

Starting the Prefect API and a Dask cluster costs seconds to a minute (more on a loaded machine), and
importing torch, pandas, zarr or Prefect costs seconds more; a typo in a path should not. Everything here
uses only the standard library and fsspec, and reads a few bytes per file: a bad path or option answers in
about the time the CLI takes to start, with the same one-line messages the run itself would give.

What is checked (cheap, and certain to fail the run later if wrong):

- options: dtype, solver, steps / batch / block sizes, patch mode, modality lists, cluster spec (and a
  slurm spec file, an optional extra), run id, bbox and dates, the loop spec, controls and iterations;
- source: reachable, holds at least one ``Core-*`` dataset with a ``metadata.parquet`` that is a parquet
  file (magic bytes at both ends); column checks stay with the reader;
- inputs of ``copgen generate``: each given image exists;
- checkpoints (local or object store): the file exists and starts like a safetensors file (8-byte header
  length + JSON header) or a torch checkpoint (zip or pickle); ``hf://`` URLs are left to the loader;
- output: a local ``--out`` is (or can be made) a writable folder; every ``*.zarr`` store already directly
  under ``--out`` is a copgen cube (a store that is not ours is never written into).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from copgen.errors import CopgenError
from copgen.modalities import Modality

# Mirrors of the heavier modules' choices (tests/flows/test_preflight.py pins that they agree).
DTYPES = ("float32", "bfloat16", "float16", "auto")
SOLVERS = ("release", "2m")
PATCH_MODES = ("center", "grid")
METADATA_FILE = "metadata.parquet"
_PARQUET_MAGIC = b"PAR1"


class PreflightError(CopgenError, ValueError):
    """An argument, source, checkpoint or output that would make the run fail."""


def _redact(url: str) -> str:
    from copgen.storage.fsutil import redact_url

    return redact_url(url)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fs(url: str, storage_options: Mapping[str, Any] | None):
    import fsspec

    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def _join(*parts: str) -> str:
    from copgen.storage.fsutil import join_url

    return join_url(*parts)


# ---- options --------------------------------------------------------------------------------------------


def check_model_options(dtype: str, solver: str, steps: int, batch_size: int) -> None:
    if dtype not in DTYPES:
        raise PreflightError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if solver.lower() not in SOLVERS:
        raise PreflightError(f"--solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if steps < 1 or batch_size < 1:
        raise PreflightError(f"steps={steps}, batch_size={batch_size}: both must be >= 1")


def check_run_options(
    *,
    patches: str,
    cluster: str,
    workers: int | None,
    block_samples: int,
    run_id: str | None = None,
    generate: str | None = None,
    bbox: tuple[float, ...] | None = None,
    dates: Iterable[tuple[str, str | None]] = (),
) -> None:
    from copgen.flows.clusters import ClusterError, check_cluster, parse_cluster
    from copgen.storage.fsutil import check_id

    if patches not in PATCH_MODES:
        raise PreflightError(f"--patches {patches!r}: choose 'center' or 'grid'")
    if block_samples < 1:
        raise PreflightError(f"--block-samples {block_samples}: must be >= 1")
    try:
        check_cluster(parse_cluster(cluster, n_workers=workers))
    except ClusterError as exc:
        raise PreflightError(str(exc)) from None
    if run_id is not None:
        try:
            check_id(run_id, "--run-id")
        except ValueError as exc:
            raise PreflightError(str(exc)) from None
    if generate not in (None, "", "missing"):
        for name in filter(None, generate.replace(" ", ",").split(",")):
            try:
                Modality.parse(name)
            except ValueError as exc:
                raise PreflightError(f"--generate: {exc}") from None
    if bbox is not None:
        min_lon, min_lat, max_lon, max_lat = bbox
        if not (-90 <= min_lat <= max_lat <= 90 and -180 <= min_lon <= 180 and -180 <= max_lon <= 180):
            raise PreflightError(f"bbox must be (min_lon, min_lat, max_lon, max_lat) in degrees, got {bbox}")
    for option, value in dates:
        if value is not None:
            try:
                datetime.fromisoformat(value)
            except ValueError:
                raise PreflightError(f"{option} {value!r}: not an ISO date (e.g. 2020-01-01)") from None


def check_loop_options(*, spec: str, iterations: int, seed_policy: str, controls: str, inject_p: float,
                       carry: str, cells: int | None = None, reference_cells: int | None = None) -> None:
    """``copgen loop``'s own options, parsed as the run parses them (``copgen.loop_config``, torch-free)."""
    from copgen.loop_config import LoopError, loop_configs

    if iterations < 1:
        raise PreflightError(f"--iterations {iterations!r}: must be an integer >= 1")
    for option, value in (("--cells", cells), ("--reference-cells", reference_cells)):
        if value is not None and value < 0:
            raise PreflightError(f"{option} {value!r}: must be an integer >= 0")
    items = [c.strip() for c in (controls or "").split(",") if c.strip() and c.strip() != "none"]
    try:
        loop_configs(spec, iterations, seed_policy, items, inject_p, carry)
    except LoopError as exc:
        raise PreflightError(str(exc)) from None


# ---- source ---------------------------------------------------------------------------------------------


def check_source(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The ``Core-*`` datasets found under ``url`` (names); raises when there is none or one is no parquet."""
    try:
        fs, _ = _fs(url, storage_options)
        found = []
        for m in Modality:
            meta = _join(url, m.dataset, METADATA_FILE)
            path = fs._strip_protocol(meta)
            if not fs.exists(path):
                continue
            _check_parquet(fs, path, m.dataset, meta)
            found.append(m.dataset)
    except PreflightError:
        raise
    except Exception as exc:  # network / credential errors from any fsspec backend
        raise PreflightError(f"cannot reach {_redact(url)}: {_describe(exc)}") from exc
    if not found:
        where = _redact(url)
        raise PreflightError(f"Major TOM: no Core-* dataset with a {METADATA_FILE} found under {where}")
    return found


def check_exists(option: str, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """``url`` names something that exists (a file or a folder); for sources whose kind is decided later
    (``copgen train``: a Major TOM tree, a cube or an export corpus)."""
    try:
        fs, path = _fs(url, storage_options)
        found = fs.exists(path)
    except Exception as exc:  # network / credential errors from any fsspec backend
        raise PreflightError(f"{option} {_redact(url)}: cannot reach it: {_describe(exc)}") from exc
    if not found:
        raise PreflightError(f"{option} {_redact(url)}: no such file or folder")


def _check_parquet(fs, path: str, dataset: str, url: str) -> None:
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        head = f.read(4)
        tail = b""
        if size >= 12:
            f.seek(size - 4)
            tail = f.read(4)
    if head != _PARQUET_MAGIC or tail != _PARQUET_MAGIC:
        raise PreflightError(f"{dataset}, file {_redact(url)}: unreadable metadata parquet "
                             f"(not a parquet file: {size} bytes without the PAR1 magic at both ends)")


# ---- checkpoints ----------------------------------------------------------------------------------------


def check_checkpoint(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """The file exists and its first bytes are those of a safetensors or torch checkpoint."""
    if url.startswith("hf://"):
        return  # the loader downloads (and caches) it; checking would cost the same round trips
    shown = _redact(url)
    try:
        fs, path = _fs(url, storage_options)
        size = fs.size(path)
        with fs.open(path, "rb") as f:
            head = f.read(9)
            if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
                n = int.from_bytes(head[:8], "little")
                f.seek(8)
                header = f.read(n)
                try:
                    json.loads(header)
                except ValueError as exc:
                    raise PreflightError(
                        f"corrupted or truncated safetensors file {shown}: header is not JSON ({exc})"
                    ) from None
                return
    except PreflightError:
        raise
    except Exception as exc:
        raise PreflightError(f"cannot read {shown}: {_describe(exc)}") from exc
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return
    raise PreflightError(f"{shown} is neither a safetensors file nor a torch checkpoint ({size} bytes; "
                         "corrupted or truncated?)")


def check_inputs(paths: Mapping[str, str], storage_options: Mapping[str, Any] | None = None) -> None:
    """``copgen generate``'s input images (option name -> path): each exists and is a file."""
    for option, url in paths.items():
        try:
            fs, path = _fs(url, storage_options)
            ok = fs.isfile(path)
        except Exception as exc:
            raise PreflightError(f"{option} {_redact(url)}: cannot read it: {_describe(exc)}") from exc
        if not ok:
            raise PreflightError(f"{option} {_redact(url)}: no such file")


# ---- output ---------------------------------------------------------------------------------------------


def check_output(out: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """A local ``out`` is a writable folder (created if absent); existing ``*.zarr`` under it are ours."""
    try:
        fs, root = _fs(out, storage_options)
        local = type(fs).__name__ == "LocalFileSystem"
        if local:
            _check_local_folder(root, out)
        stores = fs.glob(f"{root.rstrip('/')}/*.zarr") if fs.exists(root) else []
    except PreflightError:
        raise
    except Exception as exc:
        raise PreflightError(f"--out {_redact(out)}: cannot list it: {_describe(exc)}") from exc
    for store in sorted(stores):
        _check_ours(fs, store, _join(out, store.rstrip("/").rsplit("/", 1)[-1]))


def _check_local_folder(root: str, out: str) -> None:
    if os.path.exists(root) and not os.path.isdir(root):
        raise PreflightError(f"--out {out}: exists and is not a folder")
    probe = os.path.join(root, f".copgen-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"")
        os.remove(probe)
    except OSError as exc:
        raise PreflightError(f"--out {out}: cannot write there ({_describe(exc)})") from None


def _check_ours(fs, store: str, url: str) -> None:
    meta_path = f"{store.rstrip('/')}/zarr.json"
    if not fs.exists(meta_path):
        if fs.isdir(store) and not fs.ls(store):
            return  # an empty folder: nothing to protect
        raise PreflightError(f"{_redact(url)} is not a copgen cube (no zarr.json): a store that is not ours "
                             "is never written into; choose another --out")
    try:
        attrs = json.loads(fs.cat_file(meta_path)).get("attributes", {})
    except ValueError as exc:
        raise PreflightError(f"{_redact(url)}: unreadable zarr.json ({exc})") from None
    if not isinstance(attrs.get("copgen_cube"), dict):
        raise PreflightError(f"{_redact(url)} is not a copgen cube (no copgen_cube attribute): a store that "
                             "is not ours is never written into; choose another --out")
