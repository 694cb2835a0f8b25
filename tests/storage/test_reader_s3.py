"""The writer and reader against a real S3 endpoint (moto server): round trip and one-row-group reads."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs.core
from copgen.modalities import Modality
from copgen.storage.majortom.reader import MajorTomReader, SourceError
from copgen.storage.majortom.writer import CellRecord, synthetic_records, write_dataset

SIZE = 32
CELLS = ["454U_120R", "455U_120R", "455U_119R", "384U_1207R", "257D_694L", "566U_845R", "66D_214R"]
MISSING = {Modality.S1RTC: {"455U_119R"}, Modality.DEM: {"257D_694L"}}


@pytest.fixture(scope="module")
def s3_world(s3_server):
    bucket = s3_server.new_bucket("majortom")
    root = f"s3://{bucket}/world"
    written = {}
    for m in Modality:
        cells = [c for c in CELLS if c not in MISSING.get(m, set())]
        written[m] = list(synthetic_records(m, cells, thumbnail_size=SIZE, seed=3, bands=m == Modality.S1RTC))
        write_dataset(
            root,
            m,
            written[m],
            rows_per_part=3,
            thumbnail_format="png",
            storage_options=s3_server.storage_options,
        )
    return root, written


def test_s3_layout_and_round_trip(s3_server, s3_world):
    root, written = s3_world
    fs = s3_server.filesystem()
    bucket_path = root.removeprefix("s3://")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(bucket_path)) == sorted(m.dataset for m in Modality)
    assert fs.ls(f"{bucket_path}/Core-S2L2A/images", detail=False)[0].endswith("images/part_00001.parquet")
    with fs.open(f"{bucket_path}/Core-S2L2A/metadata.parquet", "rb") as f:
        urls = pq.read_table(f, columns=["parquet_url"]).column("parquet_url").to_pylist()
    assert urls[0] == f"{root}/Core-S2L2A/images/part_00001.parquet"

    with MajorTomReader(
        root, storage_options=s3_server.storage_options, thumbnail_sizes={m: SIZE for m in Modality}
    ) as reader:
        pairing = reader.pair()
        assert sorted(pairing.incomplete.grid_cell) == ["257D_694L", "455U_119R"]
        assert len(pairing.complete) == len(CELLS) - 2
        for m in Modality:
            got = reader.fetch_thumbnails(pairing.pairs, m).thumbnails
            assert set(got) == {r.grid_cell for r in written[m]}
            # exact: uint8, lossless codec
            assert all(np.array_equal(got[r.grid_cell], r.thumbnail) for r in written[m])
        s1 = written[Modality.S1RTC][2]
        ref = next(r for r in reader.refs(pairing.pairs, "S1RTC") if r.grid_cell == s1.grid_cell)
        sample = reader.read_sample(ref, thumbnail=False, bands=["vv", "vh"])
    assert sample.thumbnail is None
    # exact: the stored bytes come back
    assert np.array_equal(sample.bands["vv"], s1.bands["vv"]) and np.array_equal(
        sample.bands["vh"], s1.bands["vh"]
    )


def test_s3_sample_read_fetches_one_row_group(s3_server, monkeypatch):
    """Count the byte ranges s3fs actually GETs from the server while reading single samples."""
    bucket = s3_server.new_bucket("rowgroup")
    root = f"s3://{bucket}/w"
    rng = np.random.default_rng(1)
    recs = [  # incompressible 96 px thumbnails: ~28 KB per row group, 7 row groups in one part
        CellRecord(
            c,
            thumbnail=rng.integers(0, 256, (96, 96, 3), dtype=np.uint8),
            product_id=f"P{i}",
            timestamp="20230101T000000",
        )
        for i, c in enumerate(CELLS)
    ]
    write_dataset(
        root,
        "S1RTC",
        recs,
        rows_per_part=len(recs),
        thumbnail_format="png",
        storage_options=s3_server.storage_options,
    )
    fs = s3_server.filesystem()
    part = f"{bucket}/w/Core-S1RTC/images/part_00001.parquet"
    size = fs.size(part)
    with fs.open(part, "rb") as f:
        md = pq.ParquetFile(f).metadata

    ranges: list[tuple[str, int]] = []
    original = s3fs.core._fetch_range

    def counting(fs_, bucket_, key, version_id, start, end, **kw):
        data = original(fs_, bucket_, key, version_id, start, end, **kw)
        ranges.append((key, len(data)))
        return data

    monkeypatch.setattr(s3fs.core, "_fetch_range", counting)
    with MajorTomReader(
        root, storage_options=s3_server.storage_options, thumbnail_sizes={"S1RTC": 96}
    ) as reader:
        refs = reader.refs(reader.read_metadata("S1RTC").frame, "S1RTC")
        ranges.clear()
        first = reader.read_sample(refs[2])
        first_ranges = [r for r in ranges if r[0].endswith("part_00001.parquet")]
        ranges.clear()
        second = reader.read_sample(refs[5])
        second_ranges = list(ranges)
    # exact: uint8 through a lossless codec
    assert np.array_equal(first.thumbnail, recs[2].thumbnail) and np.array_equal(
        second.thumbnail, recs[5].thumbnail
    )
    rg = md.row_group(5)
    thumb = next(rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema == "thumbnail")
    second_bytes = sum(n for _, n in second_ranges)
    # the cached footer is not fetched again: one coalesced GET of the row group's grid_cell..thumbnail
    assert len(second_ranges) == 1
    assert thumb.total_compressed_size <= second_bytes <= rg.total_byte_size
    first_bytes = sum(n for _, n in first_ranges)
    assert len(first_ranges) <= 3  # footer tail (+ rest of a large footer) + the row group
    assert first_bytes <= md.serialized_size + 8 + 65_536 + rg.total_byte_size
    assert first_bytes < size / 2, (first_bytes, size)


def test_s3_missing_part_is_named(s3_server, s3_world):
    root, _ = s3_world
    bucket = s3_server.new_bucket("broken")
    fs = s3_server.filesystem()
    src = root.removeprefix("s3://") + "/Core-DEM"
    fs.copy(src, f"{bucket}/Core-DEM", recursive=True)
    fs.rm(f"{bucket}/Core-DEM/images/part_00002.parquet")
    with MajorTomReader(
        f"s3://{bucket}",
        storage_options=s3_server.storage_options,
        thumbnail_sizes={"DEM": SIZE},
        on_error="skip",
    ) as reader:
        result = reader.fetch_thumbnails(reader.pair().pairs, "DEM")
        assert {b.file for b in result.bad} == {f"s3://{bucket}/Core-DEM/images/part_00002.parquet"}
        assert len(result.bad) == 3 and len(result.samples) == len(CELLS) - 1 - 3
        with pytest.raises(SourceError, match="part_00002.parquet.*not found"):
            reader.fetch_thumbnails(reader.pair().pairs, "DEM", on_error="raise")
