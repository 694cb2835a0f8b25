"""Metrics and provenance tables (DESIGN §3, §7) as Parquet, partitioned by run.

Layout under a table URL (e.g. ``<out>/tables/metrics``)::

    run_id=<run id>/part-<part id>.parquet

One part per work block (``part id`` = the block id), written by the worker that wrote the block, so no
two writers share a file. ``run_id`` lives in the directory name only (hive partitioning): pandas,
pyarrow.dataset and duckdb (``hive_partitioning=true``) all turn it back into a column. Each part has a
fixed schema, so parts with all-null columns still concatenate, and no pandas metadata, so the same rows
give the same bytes (a re-run of a block rewrites an identical part).

Exactly once per block (``block_part=True``, what the flows use for block parts): the part name is
``<cube>-<block id>``, the same in every run, and writing it removes the parts of that name in *other*
``run_id=`` partitions after the new one is in place. The block's ledger marker is written only after that,
so a block with a marker has exactly one part, in the partition of the run that last wrote it; a crash
between the two leaves no marker and the redo (under any run id) cleans up. Temporary files of local writes
are hidden (``.part-*.tmp``: pyarrow, pandas and duckdb globs skip them) and a later write of the same part
removes any a crash left behind.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from copgen.errors import CopgenError
from copgen.modalities import Modality
from copgen.records import ORIGIN_CODES
from copgen.storage.objects import check_id, redact
from fsspec.implementations.local import LocalFileSystem

METRICS_SCHEMA = pa.schema([
    ("condition", pa.string()),  # the loop condition (spec + control + seed policy + injection), or the job
    ("loop_spec", pa.string()),
    ("iteration", pa.int32()),
    ("modality", pa.string()),
    ("metric", pa.string()),
    ("comparison", pa.string()),  # real | previous | reference | self (copgen.metrics)
    ("value", pa.float64()),
    ("ci_low", pa.float64()),
    ("ci_high", pa.float64()),
    ("n", pa.int64()),
    ("seed_policy", pa.string()),
    ("steps", pa.int32()),
    ("sampler", pa.string()),
    ("reference_set", pa.string()),
    ("feature_extractor", pa.string()),
    ("grid_cell", pa.string()),  # set on per-sample (paired) rows, null on aggregate rows
    ("patch", pa.string()),
    ("sample", pa.int64()),  # index along the cube's sample axis on per-sample rows
    ("bin", pa.float64()),  # lower edge of a histogram bin on hist/<band> rows
    ("level", pa.string()),  # sample | summary | histogram: filter on it before any aggregation
])
# ``level`` tells the row kinds apart, so no query has to know that ``sample IS NULL`` marks a summary:
# ``sample``: one sample's paired metric (per-sample rows, aggregated into the summaries);
# ``summary``: one value (with CI) per (run, condition, iteration, modality, metric, comparison);
# ``histogram``: one bin of a per-band pixel histogram (``bin`` = its lower edge).
METRIC_LEVELS = ("sample", "summary", "histogram")
METRICS_REQUIRED = ("iteration", "metric", "value", "n")

ORIGINS = tuple(ORIGIN_CODES)  # the labels of copgen.records.Origin
PROVENANCE_SCHEMA = pa.schema([
    ("grid_cell", pa.string()),
    ("patch", pa.string()),
    ("sample", pa.int64()),  # index along the cube's sample axis
    ("iteration", pa.int32()),
    ("modality", pa.string()),
    ("origin", pa.string()),  # real | generated | absent
    ("conditioned_on", pa.list_(pa.string())),  # modalities that conditioned a generated tile
    ("product_id", pa.string()),  # source product of a real tile
    ("product_time", pa.timestamp("ms", tz="UTC")),
    ("loop_spec", pa.string()),
    ("seed", pa.int64()),
    ("sampler", pa.string()),
    ("steps", pa.int32()),
    ("network_sha256", pa.string()),
    ("autoencoder_sha256", pa.string()),
    ("package_version", pa.string()),
    ("synthetic", pa.bool_()),
])
PROVENANCE_REQUIRED = ("grid_cell", "patch", "sample", "iteration", "modality", "origin", "synthetic")


class TableError(CopgenError, ValueError):
    """A table row does not fit the schema; the message names the table, row, cell and field."""


def _is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NaT


def _rows(rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(rows, pd.DataFrame):
        return [{k: (None if _is_null(v) else v) for k, v in r.items()} for r in rows.to_dict("records")]
    return [dict(r) for r in rows]


def _validate(table: str, rows: list[dict[str, Any]], schema: pa.Schema, required: tuple[str, ...]) -> None:
    names = set(schema.names)
    for i, row in enumerate(rows):
        where = f"{table} row {i} (grid_cell={row.get('grid_cell')!r}, patch={row.get('patch')!r})"
        unknown = set(row) - names - {"run_id"}
        if unknown:
            raise TableError(f"{where}: unknown fields {sorted(unknown)}; schema fields: {schema.names}")
        for f in required:
            if _is_null(row.get(f)):
                raise TableError(f"{where}: field {f!r} is required")
        if not _is_null(row.get("modality")):
            try:
                row["modality"] = Modality.parse(row["modality"]).name
            except ValueError as e:
                raise TableError(f"{where}: field 'modality': {e}") from None
        if "origin" in names and row.get("origin") not in ORIGINS:
            raise TableError(f"{where}: field 'origin' must be one of {ORIGINS}, got {row.get('origin')!r}")
        for f in schema:
            v = row.get(f.name)
            # a DataFrame column of ints with gaps arrives as floats (3.0): restore the int
            if isinstance(v, float) and v.is_integer() and (pa.types.is_integer(f.type) or f.name == "patch"):
                row[f.name] = int(v)
        if "patch" in row and not _is_null(row["patch"]):
            row["patch"] = str(row["patch"])


def metric_level(row: Mapping[str, Any]) -> str:
    """The ``level`` of a metrics row from its shape (rows written before the column existed)."""
    if not _is_null(row.get("sample")):
        return "sample"
    return "histogram" if not _is_null(row.get("bin")) else "summary"


def _to_table(table: str, rows: list[dict[str, Any]], schema: pa.Schema, run_id: str) -> pa.Table:
    for i, row in enumerate(rows):
        if row.pop("run_id", run_id) != run_id:
            raise TableError(f"{table} row {i}: run_id differs from the partition's run id {run_id!r}")
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
        raise TableError(f"{table}: rows do not fit the schema: {e}") from None


def part_url(table_url: str, run_id: str, part: str) -> str:
    """``<table_url>/run_id=<run_id>/part-<part>.parquet`` with both ids validated."""
    check_id(run_id, "run id")
    check_id(part, "part id")
    return f"{table_url.rstrip('/')}/run_id={run_id}/part-{part}.parquet"


def _write_part(url: str, table: pa.Table, storage_options: Mapping[str, Any] | None,
                block_part: bool = False) -> str:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    local = isinstance(fs, LocalFileSystem)
    run_dir, name = path.rsplit("/", 1)
    table_dir = run_dir.rsplit("/", 1)[0]
    if local:  # temp file + rename: readers never see a torn part
        os.makedirs(run_dir, exist_ok=True)
        pattern = os.path.join(glob.escape(table_dir), "run_id=*", f".{glob.escape(name)}.*.tmp")
        for stale in glob.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)  # left by a crashed write of this same part
        tmp = os.path.join(run_dir, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    else:  # one PUT: atomic per object on S3
        fs.pipe_file(path, data)
    if block_part:  # exactly once: the same block's part from any other run goes
        fs.invalidate_cache(table_dir)
        for other in fs.glob(f"{table_dir}/run_id=*/{name}"):
            if other.rstrip("/") != path.rstrip("/"):
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(other)
    return url


def write_metrics(
    table_url: str,
    run_id: str,
    part: str,
    rows: pd.DataFrame | Iterable[Mapping[str, Any]],
    storage_options: Mapping[str, Any] | None = None,
    block_part: bool = False,
) -> str:
    """Write one part of the long metrics table; returns its URL. Missing optional fields are null.
    ``block_part``: the part of one cube block, replacing that block's part of any other run."""
    url = part_url(table_url, run_id, part)
    data = _rows(rows)
    _validate("metrics", data, METRICS_SCHEMA, METRICS_REQUIRED)
    for i, row in enumerate(data):
        level = metric_level(row)
        if _is_null(row.get("level")):
            row["level"] = level
        elif row["level"] != level:
            raise TableError(f"metrics row {i}: field 'level' is {row['level']!r} but the row is a {level} "
                             f"row (levels: {METRIC_LEVELS})")
    return _write_part(url, _to_table("metrics", data, METRICS_SCHEMA, run_id), storage_options, block_part)


def write_provenance(
    table_url: str,
    run_id: str,
    part: str,
    rows: pd.DataFrame | Iterable[Mapping[str, Any]],
    storage_options: Mapping[str, Any] | None = None,
    block_part: bool = False,
) -> str:
    """Write one part of the per-sample provenance table (one row per sample, iteration, modality).
    ``block_part``: the part of one cube block, replacing that block's part of any other run."""
    url = part_url(table_url, run_id, part)
    data = _rows(rows)
    _validate("provenance", data, PROVENANCE_SCHEMA, PROVENANCE_REQUIRED)
    for i, row in enumerate(data):
        cond = row.get("conditioned_on")
        if not _is_null(cond) and not isinstance(cond, str):
            row["conditioned_on"] = [Modality.parse(m).name for m in cond]
        elif isinstance(cond, str):
            raise TableError(f"provenance row {i}: field 'conditioned_on' must be a list of modalities")
    return _write_part(url, _to_table("provenance", data, PROVENANCE_SCHEMA, run_id), storage_options,
                       block_part)


def dataset(table_url: str, storage_options: Mapping[str, Any] | None = None) -> pads.Dataset:
    """The table as a ``pyarrow.dataset`` (``run_id`` comes from the hive partition directories)."""
    fs, path = fsspec.core.url_to_fs(table_url, **dict(storage_options or {}))
    fs.invalidate_cache(path)
    try:
        hive = pads.partitioning(pa.schema([("run_id", pa.string())]), flavor="hive")
        ds = pads.dataset(path, filesystem=fs, format="parquet", partitioning=hive)
        if "metric" in ds.schema.names:  # metrics: parts written before a column existed read it as null
            schema = METRICS_SCHEMA.append(pa.field("run_id", pa.string()))
            ds = pads.dataset(path, filesystem=fs, format="parquet", partitioning=hive, schema=schema)
        return ds
    except FileNotFoundError:
        raise FileNotFoundError(f"no table at {redact(table_url)}") from None


def read_table(
    table_url: str, storage_options: Mapping[str, Any] | None = None, run_id: str | None = None
) -> pd.DataFrame:
    """The table as pandas (optionally one run only), sorted for stable output."""
    ds = dataset(table_url, storage_options)
    flt = None if run_id is None else pads.field("run_id") == check_id(run_id, "run id")
    df = ds.to_table(filter=flt).to_pandas()
    if "level" in df and df["level"].isna().any():  # parts from before the level column
        missing = df["level"].isna()
        old = df.loc[missing, ["sample", "bin"]].to_dict("records")
        df.loc[missing, "level"] = [metric_level(r) for r in old]
    order = ("run_id", "sample", "grid_cell", "patch", "iteration", "modality", "metric")
    keys = [c for c in order if c in df]
    return df.sort_values(keys, kind="stable", ignore_index=True) if keys else df
