"""Bad Major TOM input: every case raises a SourceError naming where, and skip mode records it instead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from copgen.modalities import Modality
from copgen.storage.majortom.reader import MajorTomReader, SourceError
from copgen.storage.majortom.writer import CellRecord, synthetic_records, write_dataset

SIZE = 24
CELLS = ["454U_120R", "455U_120R", "455U_119R", "384U_1207R", "257D_694L", "566U_845R"]


def _world(root: Path, modality: str = "S2L2A", rows_per_part: int = 3, edit=None) -> list[CellRecord]:
    """Write a small dataset; ``edit(records)`` may corrupt some records before writing."""
    recs = list(synthetic_records(modality, CELLS, thumbnail_size=SIZE, seed=1))
    if edit is not None:
        edit(recs)
    write_dataset(str(root), modality, recs, rows_per_part=rows_per_part, thumbnail_format="png")
    return recs


def _reader(root: Path, **kw) -> MajorTomReader:
    return MajorTomReader(str(root), thumbnail_sizes={m: SIZE for m in Modality}, **kw)


def _edit_metadata(root: Path, modality: str, change) -> None:
    """Rewrite ``metadata.parquet`` through pandas: ``change(df) -> df``."""
    path = root / f"Core-{modality}" / "metadata.parquet"
    df = change(pq.read_table(path).to_pandas())
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)


def _fetch_both_modes(root: Path, modality: str = "S2L2A"):
    """Fetch every sample in raise mode (expecting one SourceError) and in skip mode."""
    with _reader(root) as reader:
        frame = reader.read_metadata(modality).frame
        with pytest.raises(SourceError) as err:
            reader.fetch_thumbnails(frame, modality)
    with _reader(root, on_error="skip") as reader:
        result = reader.fetch_thumbnails(reader.read_metadata(modality).frame, modality)
    return err.value, result


def _assert_where(err: SourceError, *, cell: str, field: str | None, row_group: int | None, file_part: str):
    text = str(err)
    assert err.dataset == "Core-S2L2A" and "Core-S2L2A" in text
    assert err.cell == cell and cell in text
    assert err.field == field and (field is None or repr(field) in text)
    assert err.row_group == row_group and (row_group is None or f"row group {row_group}" in text)
    assert file_part in (err.file or "") and file_part in text


def test_corrupt_image_bytes(tmp_path):
    def corrupt(recs):
        recs[1].thumbnail = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40  # PNG magic, garbage body

    recs = _world(tmp_path, edit=corrupt)
    err, result = _fetch_both_modes(tmp_path)
    _assert_where(err, cell=CELLS[1], field="thumbnail", row_group=1, file_part="part_00001.parquet")
    assert "decode" in err.reason
    assert [b.grid_cell for b in result.bad] == [CELLS[1]]
    assert result.bad[0].field == "thumbnail" and result.bad[0].row_group == 1
    good = result.thumbnails
    assert list(good) == [c for c in CELLS if c != CELLS[1]]
    # exact: uint8 through a lossless codec
    assert all(np.array_equal(good[r.grid_cell], r.thumbnail) for r in recs if r.grid_cell in good)


def test_wrong_thumbnail_size(tmp_path):
    def resize(recs):
        recs[4].thumbnail = np.zeros((SIZE * 2, SIZE * 2, 3), np.uint8)

    _world(tmp_path, edit=resize)
    err, result = _fetch_both_modes(tmp_path)
    _assert_where(err, cell=CELLS[4], field="thumbnail", row_group=1, file_part="part_00002.parquet")
    assert f"{SIZE * 2}x{SIZE * 2}" in err.reason and f"expected {SIZE}x{SIZE}" in err.reason
    assert [b.grid_cell for b in result.bad] == [CELLS[4]] and len(result.samples) == len(CELLS) - 1


def test_truncated_parquet_file(tmp_path):
    _world(tmp_path)
    part = tmp_path / "Core-S2L2A" / "images" / "part_00002.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    err, result = _fetch_both_modes(tmp_path)
    _assert_where(err, cell=CELLS[3], field=None, row_group=0, file_part="part_00002.parquet")
    assert "not a readable parquet file" in err.reason
    assert [b.grid_cell for b in result.bad] == CELLS[3:]  # the whole part, recorded per sample
    assert [s.grid_cell for s in result.samples] == CELLS[:3]


def test_missing_parquet_file(tmp_path):
    _world(tmp_path)
    (tmp_path / "Core-S2L2A" / "images" / "part_00001.parquet").unlink()
    err, result = _fetch_both_modes(tmp_path)
    _assert_where(err, cell=CELLS[0], field=None, row_group=0, file_part="part_00001.parquet")
    assert "not found" in err.reason
    assert [b.grid_cell for b in result.bad] == CELLS[:3] and [s.grid_cell for s in result.samples] == CELLS[
        3:
    ]


def test_row_group_out_of_range_and_cell_mismatch(tmp_path):
    _world(tmp_path)

    def shift(df):
        df.loc[df.grid_cell == CELLS[2], "parquet_row"] = 7  # the part has 3 row groups
        df.loc[df.grid_cell == CELLS[5], "parquet_row"] = 0  # row group 0 of part 2 holds CELLS[3]
        return df

    _edit_metadata(tmp_path, "S2L2A", shift)
    err, result = _fetch_both_modes(tmp_path)
    _assert_where(err, cell=CELLS[2], field="parquet_row", row_group=7, file_part="part_00001.parquet")
    assert "out of range" in err.reason
    bad = {b.grid_cell: b for b in result.bad}
    assert sorted(bad) == sorted([CELLS[2], CELLS[5]])
    assert bad[CELLS[5]].field == "grid_cell" and CELLS[3] in bad[CELLS[5]].reason
    assert len(result.samples) == len(CELLS) - 2


def test_missing_metadata_column_always_raises(tmp_path):
    _world(tmp_path)
    _edit_metadata(tmp_path, "S2L2A", lambda df: df.drop(columns=["cloud_cover"]))
    for mode in ("raise", "skip"):  # skipping would hide a whole dataset: never
        with _reader(tmp_path, on_error=mode) as reader, pytest.raises(SourceError) as err:
            reader.pair()
        assert err.value.field == "cloud_cover" and "metadata.parquet" in str(err.value)


def test_missing_image_column(tmp_path):
    _world(tmp_path)
    part = tmp_path / "Core-S2L2A" / "images" / "part_00002.parquet"
    table = pq.read_table(part)
    with pq.ParquetWriter(part, table.schema.remove(table.schema.get_field_index("thumbnail"))) as w:
        for i in range(table.num_rows):  # keep one row group per sample
            w.write_table(table.slice(i, 1).drop_columns(["thumbnail"]))
    err, result = _fetch_both_modes(tmp_path)
    _assert_where(err, cell=CELLS[3], field="thumbnail", row_group=0, file_part="part_00002.parquet")
    assert "column missing" in err.reason
    assert [b.grid_cell for b in result.bad] == CELLS[3:]


def test_malformed_and_unknown_cell_ids(tmp_path):
    _world(tmp_path)

    def rename(df):
        df.loc[1, "grid_cell"] = "455X_120R"  # malformed
        df.loc[4, ["grid_cell", "grid_row_u", "grid_col_r"]] = [
            "950U_3R",
            950,
            3,
        ]  # no row 950U (ends at 946U)
        return df

    _edit_metadata(tmp_path, "S2L2A", rename)
    with _reader(tmp_path) as reader, pytest.raises(SourceError) as err:
        reader.pair()
    _assert_where(
        err.value, cell="455X_120R", field="grid_cell", row_group=None, file_part="metadata.parquet"
    )
    assert err.value.metadata_row == 1 and "metadata row 1" in str(err.value)
    with _reader(tmp_path, on_error="skip") as reader:
        pairing = reader.pair()
        got = reader.fetch_thumbnails(pairing.pairs, "S2L2A")
    assert {(b.grid_cell, b.metadata_row, b.field) for b in pairing.bad} == {
        ("455X_120R", 1, "grid_cell"),
        ("950U_3R", 4, "grid_cell"),
    }
    assert "950U" in next(b.reason for b in pairing.bad if b.metadata_row == 4)
    assert sorted(pairing.pairs.grid_cell) == sorted(c for i, c in enumerate(CELLS) if i not in (1, 4))
    assert len(got.samples) == len(CELLS) - 2 and not got.bad


def test_bad_metadata_values(tmp_path):
    _world(tmp_path)

    def spoil(df):
        df.loc[0, "timestamp"] = "not-a-time"
        df.loc[2, "grid_row_u"] = 999  # disagrees with the id
        df.loc[3, "parquet_url"] = "file:///etc/passwd"  # not an images/part_NNNNN.parquet path
        df.loc[5, "cloud_cover"] = 250.0
        return df

    _edit_metadata(tmp_path, "S2L2A", spoil)
    with _reader(tmp_path, on_error="skip") as reader:
        md = reader.read_metadata("S2L2A")
    assert [(b.metadata_row, b.field) for b in md.bad] == [
        (0, "timestamp"),
        (2, "grid_row_u"),
        (3, "parquet_url"),
        (5, "cloud_cover"),
    ]
    assert all(b.file.endswith("metadata.parquet") for b in md.bad)
    assert list(md.frame.grid_cell) == [CELLS[1], CELLS[4]]
    with _reader(tmp_path) as reader, pytest.raises(SourceError, match="not-a-time") as err:
        reader.read_metadata("S2L2A")
    assert (err.value.cell, err.value.field) == (CELLS[0], "timestamp")


def test_duplicate_rows_in_one_row_group(tmp_path):
    _world(tmp_path)
    part = tmp_path / "Core-S2L2A" / "images" / "part_00001.parquet"
    table = pq.read_table(part)
    with pq.ParquetWriter(part, table.schema) as w:  # row group 0 now holds the same sample twice
        w.write_table(pa.concat_tables([table.slice(0, 1), table.slice(0, 1)]), row_group_size=2)
        for i in range(1, table.num_rows):
            w.write_table(table.slice(i, 1))
    err, result = _fetch_both_modes(tmp_path)
    _assert_where(err, cell=CELLS[0], field=None, row_group=0, file_part="part_00001.parquet")
    assert "2 rows" in err.reason
    assert [b.grid_cell for b in result.bad] == [CELLS[0]] and len(result.samples) == len(CELLS) - 1


def test_corrupt_band_bytes(tmp_path):
    def corrupt(recs):
        for r in recs:
            r.bands = {"B04": np.full((8, 8), 1000, np.uint16)}
        recs[2].bands = {"B04": b"II*\x00garbage"}

    _world(tmp_path, edit=corrupt)
    with _reader(tmp_path) as reader:
        refs = reader.refs(reader.read_metadata("S2L2A").frame, "S2L2A")
        with pytest.raises(SourceError) as err:
            reader.read_samples(refs, bands=["B04"])
        skipped = reader.read_samples(refs, bands=["B04"], on_error="skip")
    _assert_where(err.value, cell=CELLS[2], field="B04", row_group=2, file_part="part_00001.parquet")
    assert [b.grid_cell for b in skipped.bad] == [CELLS[2]]
    # exact: uint16 data
    assert all(np.array_equal(s.bands["B04"], np.full((8, 8), 1000, np.uint16)) for s in skipped.samples)


def test_missing_metadata_file_and_unknown_modality(tmp_path):
    _world(tmp_path)
    (tmp_path / "Core-S2L2A" / "metadata.parquet").unlink()
    with pytest.raises(SourceError, match="no Core-"):
        _reader(tmp_path)
    with pytest.raises(SourceError) as err:
        _reader(tmp_path, modalities=["S2L2A"]).read_metadata("S2L2A")
    assert "not found" in err.value.reason and "metadata.parquet" in str(err.value)
    with pytest.raises(ValueError, match="unknown modality"):
        _reader(tmp_path, modalities=["S3"])


def test_timestamps_are_utc_and_crs_typo_is_fixed(tmp_path):
    _world(tmp_path)
    _edit_metadata(tmp_path, "S2L2A", lambda df: df.assign(crs="EPSG:" + df.crs))  # "EPSG:EPSG:326xx"
    with _reader(tmp_path) as reader:
        frame = reader.read_metadata("S2L2A").frame
    assert frame.crs.str.fullmatch(r"EPSG:\d{5}").all()
    assert str(frame.timestamp.dt.tz) == "UTC"
    raw = pq.read_table(tmp_path / "Core-S2L2A" / "metadata.parquet").to_pandas()
    expect = pd.to_datetime(raw.timestamp, format="%Y%m%dT%H%M%S").dt.tz_localize("UTC")
    assert list(frame.timestamp) == list(expect)
