"""Metrics and provenance tables: per-block Parquet parts, read back with pandas, pyarrow and duckdb."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from copgen.storage import tables
from copgen.storage.objects import StorageIdError


def _metric_rows(run: int, block: int) -> list[dict]:
    rng = np.random.default_rng([run, block])
    rows = []
    for it in range(3):
        for m in ("S1RTC", "s2l2a"):  # user spelling: normalised to the canonical name
            rows.append({"loop_spec": "S2L2A>S1RTC>S2L2A", "iteration": it, "modality": m, "metric": "psnr",
                         "value": float(rng.normal(20, 2)), "ci_low": float(rng.normal(18, 1)),
                         "ci_high": float(rng.normal(22, 1)), "n": 16, "seed_policy": "fixed", "steps": 50,
                         "sampler": "dpm_solver++", "reference_set": "heldout-v1", "feature_extractor": None})
    # per-sample paired rows carry the cell and patch
    rows.append({"iteration": 1, "modality": "S1RTC", "metric": "ssim", "value": 0.5 + block / 100, "n": 1,
                 "grid_cell": f"{block}U_7R", "patch": 3})
    return rows


def _expected(runs=(1, 2), blocks=(0, 1)) -> pd.DataFrame:
    rows = []
    for r in runs:
        for b in blocks:
            for row in _metric_rows(r, b):
                rows.append({**row, "run_id": f"run-{r}", "modality": row["modality"].upper(),
                             "patch": None if row.get("patch") is None else str(row["patch"])})
    return pd.DataFrame(rows)


def _write_metrics(url: str, so: dict | None = None) -> None:
    for r in (1, 2):
        for b in (0, 1):
            tables.write_metrics(url, f"run-{r}", f"{b:010d}-{b + 1:010d}", _metric_rows(r, b), so)


def _assert_same(df: pd.DataFrame, want: pd.DataFrame) -> None:
    keys = ["run_id", "iteration", "modality", "metric", "grid_cell"]
    got = df.sort_values(keys, na_position="first", ignore_index=True)
    want = want.sort_values(keys, na_position="first", ignore_index=True)
    assert len(got) == len(want)
    for col in ("run_id", "modality", "metric", "loop_spec", "grid_cell", "patch", "sampler"):
        assert [None if pd.isna(v) else str(v) for v in got[col]] == \
               [None if pd.isna(v) else str(v) for v in want[col]], col
    np.testing.assert_array_equal(got["iteration"].to_numpy(int), want["iteration"].to_numpy(int))  # integers
    np.testing.assert_allclose(got["value"].to_numpy(float), want["value"].to_numpy(float))
    np.testing.assert_allclose(got["ci_low"].to_numpy(float), want["ci_low"].to_numpy(float))
    assert got["feature_extractor"].isna().all()


def test_metrics_read_back_with_pandas_pyarrow_duckdb(tmp_path):
    url = str(tmp_path / "metrics")
    _write_metrics(url)
    files = sorted(p.relative_to(tmp_path / "metrics").as_posix() for p in (tmp_path / "metrics").rglob("*"))
    assert "run_id=run-1/part-0000000000-0000000001.parquet" in files
    want = _expected()

    _assert_same(pd.read_parquet(url), want)
    _assert_same(pads.dataset(url, partitioning="hive").to_table().to_pandas(), want)
    _assert_same(tables.read_table(url), want)
    con = duckdb.connect()
    df = con.execute(f"select * from read_parquet('{url}/*/*.parquet', hive_partitioning=true)").df()
    _assert_same(df, want)
    mean = con.execute(f"select avg(value) from read_parquet('{url}/*/*.parquet', hive_partitioning=true) "
                       "where run_id = 'run-2' and metric = 'psnr'").fetchone()[0]
    assert mean == pytest.approx(want.query("run_id == 'run-2' and metric == 'psnr'")["value"].mean())
    _assert_same(tables.read_table(url, run_id="run-1"), want[want.run_id == "run-1"])


def test_metrics_on_s3(s3_server):
    so = s3_server.storage_options
    url = f"s3://{s3_server.new_bucket()}/tables/metrics"
    _write_metrics(url, so)
    want = _expected()
    _assert_same(pd.read_parquet(url, storage_options=so), want)
    _assert_same(tables.read_table(url, so), want)


def test_provenance_table(tmp_path):
    url = str(tmp_path / "provenance")
    t0 = datetime(2021, 6, 1, 10, 30, tzinfo=UTC)
    rows = [
        {"grid_cell": "12U_34R", "patch": 5, "sample": 7, "iteration": 0, "modality": "S2L2A",
         "origin": "real", "product_id": "S2B_MSIL2A_20210601", "product_time": t0, "synthetic": False},
        {"grid_cell": "12U_34R", "patch": 5, "sample": 7, "iteration": 1, "modality": "S1RTC",
         "origin": "generated", "conditioned_on": ["s2l2a", "DEM"], "seed": 2**62 + 5,
         "sampler": "dpm_solver++", "steps": 50, "loop_spec": "S2L2A>S1RTC", "network_sha256": "a" * 64,
         "autoencoder_sha256": "b" * 64, "package_version": "0.1.0", "synthetic": True},
    ]
    tables.write_provenance(url, "run-1", "0000000000-0000000008", rows)
    df = pd.read_parquet(url)
    assert list(df["origin"]) == ["real", "generated"]
    assert list(df.loc[1, "conditioned_on"]) == ["S2L2A", "DEM"]  # order kept: it is the user's
    assert df.loc[1, "seed"] == 2**62 + 5 and df.loc[0, "patch"] == "5"
    assert pd.Timestamp(df.loc[0, "product_time"]) == pd.Timestamp(t0)
    assert list(df["synthetic"]) == [False, True]
    con = duckdb.connect()
    got = con.execute(f"select modality, len(conditioned_on) as k from read_parquet('{url}/*/*.parquet', "
                      "hive_partitioning=true) where origin = 'generated'").fetchall()
    assert got == [("S1RTC", 2)]


def test_same_rows_same_bytes_and_clear_errors(tmp_path):
    url = str(tmp_path / "metrics")
    part = tables.write_metrics(url, "run-1", "b0", _metric_rows(1, 0))
    first = Path(part).read_bytes()
    tables.write_metrics(url, "run-1", "b0", pd.DataFrame(_metric_rows(1, 0)))
    assert Path(part).read_bytes() == first  # a re-run of a block rewrites the identical part

    bad = _metric_rows(1, 0)
    bad[-1]["value"] = None
    msg = r"metrics row 6 \(grid_cell='0U_7R', patch=3\): field 'value'"
    with pytest.raises(tables.TableError, match=msg):
        tables.write_metrics(url, "run-1", "b1", bad)
    with pytest.raises(tables.TableError, match="unknown fields \\['colour'\\]"):
        tables.write_metrics(url, "run-1", "b1", [{**_metric_rows(1, 0)[0], "colour": 1}])
    with pytest.raises(tables.TableError, match="field 'modality': unknown modality 'S3'"):
        tables.write_metrics(url, "run-1", "b1", [{**_metric_rows(1, 0)[0], "modality": "S3"}])
    with pytest.raises(tables.TableError, match="field 'origin' must be one of"):
        tables.write_provenance(url, "run-1", "b1", [{"grid_cell": "1U_1R", "patch": 0, "sample": 0,
                                                      "iteration": 0, "modality": "DEM", "origin": "fake",
                                                      "synthetic": True}])
    with pytest.raises(StorageIdError):
        tables.write_metrics(url, "../escape", "b1", _metric_rows(1, 0))
    with pytest.raises(StorageIdError):
        tables.write_metrics(url, "run-1", "b1/../../x", _metric_rows(1, 0))
    assert sorted(p.name for p in (tmp_path / "metrics").rglob("*.parquet")) == ["part-b0.parquet"]


def test_level_column_tells_row_kinds_apart(tmp_path):
    """Every metrics row has a level (sample | summary | histogram), also rows from parts written before
    the column existed; the README's duckdb query filters on it and never double-counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    url = str(tmp_path / "metrics")
    base = {"condition": "c", "iteration": 1, "modality": "S2L2A", "comparison": "real", "metric": "psnr"}
    tables.write_metrics(url, "run-1", "p0", [
        {**base, "value": 20.0, "n": 2},  # the summary of the two samples below
        {**base, "value": 19.0, "n": 1, "sample": 0, "grid_cell": "1U_1R"},
        {**base, "value": 21.0, "n": 1, "sample": 1, "grid_cell": "2U_2R"},
        {**base, "metric": "hist/B04", "comparison": "self", "value": 0.25, "n": 2, "bin": 8.0},
    ])
    # a part from before the level column: written with the old schema
    old_schema = pa.schema([f for f in tables.METRICS_SCHEMA if f.name != "level"])
    old = [{**base, "iteration": 2, "value": 18.0, "n": 1, "sample": 0, "grid_cell": "1U_1R"}]
    pq.write_table(pa.Table.from_pylist(old, schema=old_schema), f"{url}/run_id=run-1/part-p1.parquet")
    df = tables.read_table(url)
    assert sorted(zip(df["iteration"], df["level"], strict=True)) == [
        (1, "histogram"), (1, "sample"), (1, "sample"), (1, "summary"), (2, "sample")]
    # the README's query: PSNR per iteration per condition, summary rows only
    query = (f"SELECT condition, iteration, avg(value) AS psnr FROM read_parquet('{url}/*/*.parquet', "
             "hive_partitioning = true, union_by_name = true) WHERE metric = 'psnr' AND level = 'summary' "
             "GROUP BY condition, iteration ORDER BY iteration")
    # one summary row of 20.0: exact, no arithmetic on it (the per-sample 19/21/18 must not mix in)
    assert duckdb.sql(query).fetchall() == [("c", 1, 20.0)]
    with pytest.raises(tables.TableError, match="'level' is 'summary' but the row is a sample row"):
        tables.write_metrics(url, "run-1", "p2", [{**base, "value": 1.0, "n": 1, "sample": 3,
                                                    "level": "summary"}])
