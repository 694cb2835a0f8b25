"""Write Major TOM Core datasets with the writer, read them back with the reader (local files)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from copgen.modalities import Modality
from copgen.storage import fsutil
from copgen.storage.majortom import grid
from copgen.storage.majortom.layout import layout
from copgen.storage.majortom.reader import MajorTomReader, MetadataFilter, SourceError
from copgen.storage.majortom.writer import (
    CellRecord,
    MajorTomWriter,
    RecordError,
    synthetic_records,
    write_dataset,
)
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

SIZE = 32  # tiny thumbnails keep the suite fast; the reader is told the size it should expect
SIZES = {m: SIZE for m in Modality}
# Cells spread over both hemispheres and several UTM zones, incl. the equator corner cell 1D_1L.
CELLS = [
    "454U_120R",
    "455U_120R",
    "455U_119R",
    "922D_249L",
    "1D_1L",
    "0U_0R",
    "384U_1207R",
    "257D_694L",
    "566U_845R",
    "66D_214R",
    "167U_1541R",
    "868U_30R",
]
MISSING = {Modality.S1RTC: {"455U_119R", "66D_214R"}, Modality.DEM: {"1D_1L"}, Modality.S2L1C: {"868U_30R"}}

# The published column lists (research notes §2.2 / §2.4), in file order.
PUBLISHED_METADATA = {
    Modality.S2L2A: [
        "grid_cell",
        "grid_row_u",
        "grid_col_r",
        "product_id",
        "timestamp",
        "cloud_cover",
        "nodata",
        "centre_lat",
        "centre_lon",
        "crs",
        "parquet_url",
        "parquet_row",
    ],
    Modality.S1RTC: [
        "grid_cell",
        "grid_row_u",
        "grid_col_r",
        "product_id",
        "timestamp",
        "nodata",
        "orbit_state",
        "centre_lat",
        "centre_lon",
        "crs",
        "parquet_url",
        "parquet_row",
    ],
    Modality.DEM: [
        "grid_cell",
        "grid_row_u",
        "grid_col_r",
        "nodata",
        "max_val",
        "min_val",
        "centre_lat",
        "centre_lon",
        "crs",
        "parquet_url",
        "parquet_row",
        "__index_level_0__",
    ],
}
PUBLISHED_METADATA[Modality.S2L1C] = PUBLISHED_METADATA[Modality.S2L2A]
S2_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
PUBLISHED_IMAGES = {
    Modality.S2L2A: ["product_id", "grid_cell", "product_datetime", "thumbnail", *S2_BANDS, "cloud_mask"],
    Modality.S2L1C: [
        "product_id",
        "grid_cell",
        "product_datetime",
        "thumbnail",
        *S2_BANDS[:10],
        "B10",
        "B11",
        "B12",
        "cloud_mask",
    ],
    Modality.S1RTC: ["product_id", "grid_cell", "product_datetime", "thumbnail", "vv", "vh"],
    Modality.DEM: ["grid_cell", "thumbnail", "compressed", "DEM"],
}


def _records(m: Modality, **kw) -> list[CellRecord]:
    cells = [c for c in CELLS if c not in MISSING.get(m, set())]
    return list(synthetic_records(m, cells, thumbnail_size=SIZE, seed=7, **kw))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict[Modality, list[CellRecord]]]:
    root = tmp_path_factory.mktemp("world")
    written = {}
    for m in Modality:
        written[m] = _records(m, bands=(m == Modality.S2L2A))
        # PNG for S2L1C so one optical set round-trips exactly; S2L2A keeps the published JPEG.
        fmt = "png" if m == Modality.S2L1C else None
        write_dataset(str(root), m, written[m], rows_per_part=4, thumbnail_format=fmt)
    return root, written


def test_published_schemas_and_row_groups(world):
    root, written = world
    for m in Modality:
        ds = root / m.dataset
        meta = pq.read_table(ds / "metadata.parquet")
        assert meta.column_names == PUBLISHED_METADATA[m]
        assert meta.schema.field("grid_row_u").type == pa.int64()
        assert meta.schema.field("parquet_row").type == pa.int64()
        assert meta.num_rows == len(written[m])
        parts = sorted((ds / "images").iterdir())
        assert [p.name for p in parts] == [f"part_{i:05d}.parquet" for i in range(1, len(parts) + 1)]
        assert len(parts) == -(-len(written[m]) // 4)  # 4 rows per part
        for p in parts:
            pf = pq.ParquetFile(p)
            assert pf.schema_arrow.names == PUBLISHED_IMAGES[m]
            assert all(pf.metadata.row_group(i).num_rows == 1 for i in range(pf.num_row_groups))
        df = meta.to_pandas()
        # parquet_url / parquet_row point at the row group holding that cell
        for _, row in df.iterrows():
            name = row.parquet_url.rsplit("/", 1)[-1]
            got = pq.ParquetFile(ds / "images" / name).read_row_group(row.parquet_row, columns=["grid_cell"])
            assert got.column("grid_cell")[0].as_py() == row.grid_cell
        r, c = grid.parse_cell(np.asarray(df.grid_cell, dtype=str))
        assert np.array_equal(df.grid_row_u, r) and np.array_equal(df.grid_col_r, c)  # integers
        epsg = [int(x.split(":")[1]) for x in df.crs]
        lat, lon = grid.cell_centre(np.asarray(df.grid_cell, dtype=str), np.asarray(epsg))
        np.testing.assert_allclose(df.centre_lat, lat, atol=1e-9)
        np.testing.assert_allclose(df.centre_lon, lon, atol=1e-9)
        if layout(m).has_timestamp:
            assert df.timestamp.str.fullmatch(r"\d{8}T\d{6}").all()


def test_round_trip_thumbnails_all_modalities(world):
    root, written = world
    with MajorTomReader(str(root), thumbnail_sizes=SIZES) as reader:
        assert reader.modalities == tuple(Modality)
        pairing = reader.pair()
        for m in Modality:
            got = reader.fetch_thumbnails(pairing.pairs, m).thumbnails
            expected = {r.grid_cell: r.thumbnail for r in written[m]}
            assert list(got) == [c for c in pairing.pairs.grid_cell if c in expected]  # pair order
            for cell, image in got.items():
                assert image.dtype == np.uint8 and image.shape == expected[cell].shape
                if m == Modality.S2L2A:  # published JPEG: lossy, so compare with the stored bytes
                    row = pairing.pairs.set_index("grid_cell").loc[cell]
                    stored = pq.ParquetFile(row.S2L2A_file).read_row_group(
                        int(row.S2L2A_row), columns=["thumbnail"]
                    )
                    data = stored.column("thumbnail")[0].as_py()
                    assert data[:3] == b"\xff\xd8\xff"  # JPEG magic
                    # same decoder, same process
                    assert np.array_equal(image, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                    diff = np.abs(image.astype(int) - expected[cell].astype(int))
                    assert diff.mean() < 12, (m, cell, diff.mean())
                else:
                    # exact: uint8 through a lossless codec
                    assert np.array_equal(image, expected[cell]), (m, cell)


def test_bands_round_trip_with_georeferencing(world):
    root, written = world
    rec = written[Modality.S2L2A][0]
    with MajorTomReader(str(root), thumbnail_sizes=SIZES) as reader:
        pairs = reader.pair().pairs
        ref = next(r for r in reader.refs(pairs, "S2L2A") if r.grid_cell == rec.grid_cell)
        sample = reader.read_sample(ref, bands=["B04", "B01", "cloud_mask"])
    for name in ("B04", "B01", "cloud_mask"):
        assert np.array_equal(sample.bands[name], rec.bands[name])  # exact: the stored bytes come back
        assert sample.bands[name].dtype == rec.bands[name].dtype
    crs = pairs.loc[pairs.grid_cell == rec.grid_cell, "S2L2A_crs"].item()
    geo = sample.band_geo["B04"]
    assert geo.epsg == int(crs.split(":")[1])
    xmin, _, _, ymax = grid.sample_footprint(rec.grid_cell, geo.epsg).bounds
    assert geo.origin == pytest.approx((xmin, ymax))
    assert geo.pixel_size[0] == pytest.approx(10_680 / rec.bands["B04"].shape[1])


def test_pairing_complete_missing_order_and_time_gap(world):
    root, written = world
    with MajorTomReader(str(root), thumbnail_sizes=SIZES) as reader:
        pairing = reader.pair()
    pairs = pairing.pairs
    assert sorted(pairs.grid_cell) == sorted(CELLS) and pairs.grid_cell.is_unique
    keys = list(zip(pairs.grid_row_u, pairs.grid_col_r, strict=True))
    assert keys == sorted(keys)  # deterministic order by (row, col)
    incomplete = {c for cells in MISSING.values() for c in cells}
    assert set(pairing.incomplete.grid_cell) == incomplete
    assert set(pairing.complete.grid_cell) == set(CELLS) - incomplete
    for m in Modality:
        absent = pairs[~pairs[f"{m.name}_present"]]
        assert set(absent.grid_cell) == MISSING.get(m, set())
        assert absent[f"{m.name}_file"].isna().all() and absent[f"{m.name}_row"].isna().all()
    for cell, missing in zip(pairs.grid_cell, pairs.missing, strict=True):
        assert missing == ",".join(m.name for m in Modality if cell in MISSING.get(m, set()))
    # time gap: S1 minus S2L2A, from the written records
    s1 = {r.grid_cell: pd.Timestamp(r.timestamp) for r in written[Modality.S1RTC]}
    s2 = {r.grid_cell: pd.Timestamp(r.timestamp) for r in written[Modality.S2L2A]}
    for cell, gap in zip(pairs.grid_cell, pairs.s1_s2_gap_hours, strict=True):
        if cell in s1:
            assert gap == pytest.approx((s1[cell] - s2[cell]).total_seconds() / 3600)
        else:
            assert np.isnan(gap)
    assert pairing.duplicates_dropped == {m: 0 for m in Modality}


def test_filters_match_a_direct_computation(world):
    root, written = world
    meta = pd.read_parquet(root / "Core-S2L2A" / "metadata.parquet")
    ts = pd.to_datetime(meta.timestamp, format="%Y%m%dT%H%M%S", utc=True)
    start, end = ts.sort_values().iloc[2], ts.sort_values().iloc[8]
    max_cc = float(meta.cloud_cover.median())
    flt = MetadataFilter(start=start, end=end, max_cloud_cover=max_cc, max_nodata=0.5)
    with MajorTomReader(str(root), modalities=["S2L2A"], thumbnail_sizes=SIZES) as reader:
        got = reader.read_metadata("S2L2A", flt).frame
        expect = meta[(ts >= start) & (ts <= end) & (meta.cloud_cover <= max_cc)]
        assert sorted(got.grid_cell) == sorted(expect.grid_cell) and len(got) > 0
        # bbox (min_lon, min_lat, max_lon, max_lat) around the three cells near Naples
        box = MetadataFilter(bbox=(14.0, 40.5, 14.6, 41.2))
        assert sorted(reader.pair(box).pairs.grid_cell) == ["454U_120R", "455U_119R", "455U_120R"]
        # bbox across the antimeridian holds the cell near -178 only
        wrap = reader.pair(MetadataFilter(bbox=(170.0, -85.0, -170.0, -80.0))).pairs
        assert list(wrap.grid_cell) == ["922D_249L"]
        assert list(reader.pair(MetadataFilter(cells={"0U_0R", "1D_1L"})).pairs.grid_cell) == [
            "1D_1L",
            "0U_0R",
        ]


def test_dedup_rule_counts_and_order_independence(tmp_path):
    cells = ["454U_120R", "455U_120R", "455U_119R"]
    base = {r.grid_cell: r for r in synthetic_records("S2L2A", cells, thumbnail_size=SIZE)}
    t = pd.Timestamp("2023-05-01T10:00:00")
    recs = [
        base["454U_120R"],
        CellRecord(
            "455U_120R", thumbnail=base["455U_120R"].thumbnail, product_id="B", timestamp=t, cloud_cover=30
        ),
        CellRecord(
            "455U_120R", thumbnail=base["455U_120R"].thumbnail, product_id="A", timestamp=t, cloud_cover=10
        ),
        CellRecord(
            "455U_120R",
            thumbnail=base["455U_120R"].thumbnail,
            product_id="C",
            timestamp=t - pd.Timedelta(days=3),
            cloud_cover=0,
        ),
        base["455U_119R"],
    ]
    write_dataset(str(tmp_path), "S2L2A", recs, rows_per_part=2)
    meta_path = tmp_path / "Core-S2L2A" / "metadata.parquet"
    table = pq.read_table(meta_path)
    # the published defect: the same row-group listed twice (same image), here for 454U_120R
    table = pa.concat_tables([table, table.slice(0, 1)])
    for order, name in (
        (None, "as written"),
        (np.random.default_rng(3).permutation(table.num_rows), "shuffled"),
    ):
        pq.write_table(table if order is None else table.take(order), meta_path)
        with MajorTomReader(str(tmp_path), thumbnail_sizes=SIZES) as reader:
            md = reader.read_metadata("S2L2A")
            assert md.rows_read == 6, name
            assert (md.dedup.same_image, md.dedup.same_cell, md.dedup.dropped) == (1, 2, 3), name
            kept = md.frame.set_index("grid_cell")
            # most recent first, then lowest cloud cover: product A
            assert kept.loc["455U_120R", "product_id"] == "A", name
            assert sorted(kept.index) == sorted(cells)
            with pytest.raises(SourceError, match=r"455U_120R|454U_120R") as err:
                reader.read_metadata("S2L2A", dedup=False)
            assert err.value.field == "grid_cell" and "metadata.parquet" in str(err.value)
            skipped = reader.read_metadata("S2L2A", dedup=False, on_error="skip")
            assert list(skipped.frame.grid_cell) == ["455U_119R"]
            assert sorted({b.grid_cell for b in skipped.bad}) == ["454U_120R", "455U_120R"]
            assert len(skipped.bad) == 5


def test_thumbnails_only_mode_and_missing_band_error(tmp_path):
    recs = list(synthetic_records("S1RTC", CELLS[:3], thumbnail_size=SIZE, bands=True))
    summary = write_dataset(str(tmp_path), "S1RTC", recs, include_bands=False)
    assert summary.rows == 3 and len(summary.part_urls) == 1
    part = tmp_path / "Core-S1RTC" / "images" / "part_00001.parquet"
    assert pq.ParquetFile(part).schema_arrow.names == [
        "product_id",
        "grid_cell",
        "product_datetime",
        "thumbnail",
    ]
    with MajorTomReader(str(tmp_path), thumbnail_sizes=SIZES) as reader:
        assert reader.modalities == (Modality.S1RTC,)
        ref = reader.refs(reader.read_metadata("S1RTC").frame, "S1RTC")[1]
        assert np.array_equal(reader.read_sample(ref).thumbnail, recs[1].thumbnail)  # uint8, lossless: exact
        with pytest.raises(SourceError) as err:
            reader.read_sample(ref, bands=["vv"])
    e = err.value
    assert (e.dataset, e.row_group, e.cell, e.field) == ("Core-S1RTC", 1, CELLS[1], "vv")
    assert "part_00001.parquet" in str(e) and "vv" in str(e)


def test_per_modality_urls_and_published_hf_parquet_urls(tmp_path):
    recs = list(synthetic_records("DEM", CELLS[:2], thumbnail_size=SIZE))
    write_dataset(str(tmp_path / "mirror"), "DEM", recs, parquet_url_prefix="hf")
    meta = pd.read_parquet(tmp_path / "mirror" / "Core-DEM" / "metadata.parquet")
    assert meta.parquet_url.iloc[0] == (
        "https://huggingface.co/datasets/Major-TOM/Core-DEM/resolve/main/images/part_00001.parquet"
    )
    url = (tmp_path / "mirror" / "Core-DEM").as_uri()  # file:// URL, per-modality
    with MajorTomReader(urls={"DEM": url}, thumbnail_sizes=SIZES) as reader:
        pairs = reader.pair().pairs
        assert pairs.DEM_file.iloc[0] == url + "/images/part_00001.parquet"  # read from the mirror
        got = reader.fetch_thumbnails(pairs, "DEM").thumbnails
    assert all(np.array_equal(got[r.grid_cell], r.thumbnail) for r in recs)  # uint8, lossless: exact
    with pytest.raises(SourceError, match="no Core-"):
        MajorTomReader(str(tmp_path / "empty"))


def test_writer_rejects_bad_records(tmp_path):
    good = next(iter(synthetic_records("S2L2A", ["454U_120R"], thumbnail_size=SIZE)))
    cases = [
        (
            CellRecord(
                "454X_120R",
                thumbnail=good.thumbnail,
                product_id="p",
                timestamp="20230101T000000",
                cloud_cover=1,
            ),
            "grid_cell",
        ),
        (
            CellRecord(
                "947U_0R",
                thumbnail=good.thumbnail,
                product_id="p",
                timestamp="20230101T000000",
                cloud_cover=1,
            ),
            "grid_cell",
        ),
        (
            CellRecord("454U_120R", thumbnail=good.thumbnail, timestamp="20230101T000000", cloud_cover=1),
            "product_id",
        ),
        (
            CellRecord(
                "454U_120R",
                thumbnail=good.thumbnail[:, :20],
                product_id="p",
                timestamp="20230101T000000",
                cloud_cover=1,
            ),
            "thumbnail",
        ),
        (
            CellRecord(
                "454U_120R", thumbnail=good.thumbnail, product_id="p", timestamp="yesterday", cloud_cover=1
            ),
            "timestamp",
        ),
        (
            CellRecord(
                "454U_120R",
                thumbnail=good.thumbnail,
                product_id="p",
                timestamp="20230101T000000",
                cloud_cover=140,
            ),
            "cloud_cover",
        ),
        (
            CellRecord(
                "454U_120R",
                thumbnail=good.thumbnail,
                product_id="p",
                timestamp="20230101T000000",
                cloud_cover=1,
                bands={"B99": np.zeros((4, 4), np.uint16)},
            ),
            "B99",
        ),
    ]
    with MajorTomWriter(str(tmp_path), "S2L2A") as writer:
        for record, field_name in cases:
            with pytest.raises(RecordError) as err:
                writer.write(record)
            assert err.value.field == field_name and record.grid_cell in str(err.value)
        writer.write(good)
    with pytest.raises(FileExistsError):
        MajorTomWriter(str(tmp_path), "S2L2A")


class _CountingLocalFS(LocalFileSystem):
    """A local filesystem that counts the bytes its files hand out: an outside view of what was read."""

    bytes_read = 0
    reads = 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        fs = self
        read = f.read

        def counting_read(n=-1):
            data = read(n)
            type(fs).bytes_read += len(data)
            type(fs).reads += 1
            return data

        f.read = counting_read
        return f


def test_one_sample_reads_one_row_group(tmp_path):
    """Reading a sample fetches the footer once per part plus that row group's requested columns only."""
    rng = np.random.default_rng(0)
    recs = []
    for i, cell in enumerate(CELLS):  # incompressible thumbnails: each row group is ~28 KB
        thumb = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
        recs.append(
            CellRecord(cell, thumbnail=thumb, product_id=f"P{i}", timestamp="20230101T000000", nodata=0.0)
        )
    write_dataset(str(tmp_path), "S1RTC", recs, rows_per_part=len(recs), thumbnail_format="png")
    part = tmp_path / "Core-S1RTC" / "images" / "part_00001.parquet"
    size = part.stat().st_size
    md = pq.ParquetFile(part).metadata
    fs = _CountingLocalFS()
    with MajorTomReader(str(tmp_path), filesystem=fs, thumbnail_sizes={"S1RTC": 96}) as reader:
        refs = reader.refs(reader.read_metadata("S1RTC").frame, "S1RTC")
        _CountingLocalFS.bytes_read = 0
        first = reader.read_sample(refs[5])
        first_bytes = _CountingLocalFS.bytes_read
        _CountingLocalFS.bytes_read = _CountingLocalFS.reads = 0
        second = reader.read_sample(refs[9])
        second_bytes, second_reads = _CountingLocalFS.bytes_read, _CountingLocalFS.reads
    # exact: uint8 through a lossless codec
    assert np.array_equal(first.thumbnail, recs[5].thumbnail) and np.array_equal(
        second.thumbnail, recs[9].thumbnail
    )
    rg = md.row_group(9)
    chunks = {rg.column(j).path_in_schema: rg.column(j) for j in range(rg.num_columns)}
    start = min(chunks[c].data_page_offset for c in ("grid_cell", "thumbnail"))
    end = max(
        chunks[c].data_page_offset + chunks[c].total_compressed_size for c in ("grid_cell", "thumbnail")
    )
    # second sample: no footer again, only the byte range of its own row group's columns
    assert chunks["thumbnail"].total_compressed_size <= second_bytes <= end - start + 64
    assert second_bytes <= rg.total_byte_size + 64 and second_reads <= 3
    # first sample: footer + one row group, a small share of a 12-row-group file
    footer = md.serialized_size + 8
    assert first_bytes <= footer + 65_536 + (end - start) + 64
    assert first_bytes < size / 2, (first_bytes, size)


def test_fsutil_urls():
    assert fsutil.join_url("hf://datasets/Major-TOM", "Core-S2L2A") == "hf://datasets/Major-TOM/Core-S2L2A"
    assert fsutil.join_url("s3://bucket/w/", "Core-DEM", "images") == "s3://bucket/w/Core-DEM/images"
    assert fsutil.join_url("/data/mt", "Core-DEM") == "/data/mt/Core-DEM"
    assert fsutil.redact_url("s3://AKIA:SECRET@bucket/key?sig=x") == "s3://bucket/key"
    assert fsutil.safe_component("part_00001.parquet") == "part_00001.parquet"
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            fsutil.safe_component(bad)
