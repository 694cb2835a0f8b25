"""Write Major TOM Core datasets in the published parquet layout, through fsspec (local, s3://, ...).

One writer = one modality's dataset::

    <root>/Core-<MOD>/images/part_00001.parquet   one sample per row group, ``rows_per_part`` per file
    <root>/Core-<MOD>/metadata.parquet            written on ``close()``; ``parquet_url``/``parquet_row``
                                                  point at the image row group

Column names, order and types follow ``layout.LAYOUTS`` (the published schemas). Band columns hold
single-band GeoTIFF bytes; ``thumbnail`` holds PNG or JPEG bytes (JPEG by default for S2, as published).
``include_bands=False`` writes the key columns and the thumbnail only (fast synthetic worlds).

Tests, benchmarks and the synthetic demo world build their inputs with it::

    with MajorTomWriter("s3://bucket/world", "S2L2A", storage_options=so) as w:
        w.write(CellRecord("454U_120R", thumbnail=rgb, product_id="S2A_...", timestamp="20230119T161811",
                           cloud_cover=3.5))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from copgen.errors import CopgenError
from copgen.modalities import Modality
from copgen.storage import fsutil
from copgen.storage.majortom import geotiff
from copgen.storage.majortom.layout import (
    HF_URL_PREFIX,
    IMAGES_DIR,
    METADATA_FILE,
    TIMESTAMP_FORMAT,
    ModalityLayout,
    layout,
    part_name,
)
from fsspec import AbstractFileSystem

# Band nodata written into the GeoTIFF tag (research §2.2: DEM -32767, S1 thumbnails assume -32768).
_FLUSH_BYTES = 64 << 20  # buffer at most this much image data before writing it out
_BAND_NODATA = {Modality.DEM: -32767.0, Modality.S1RTC: -32768.0, Modality.S2L1C: 0.0, Modality.S2L2A: 0.0}


class RecordError(CopgenError, ValueError):
    """A record handed to the writer is invalid; the message names dataset, cell and field."""

    def __init__(self, dataset: str, grid_cell: str, field_name: str, reason: str) -> None:
        self.dataset, self.grid_cell, self.field, self.reason = dataset, grid_cell, field_name, reason
        super().__init__(f"{dataset}: cell {grid_cell!r}, field {field_name!r}: {reason}")


@dataclass
class CellRecord:
    """One sample of one modality: what a Major TOM row knows about a grid cell.

    ``thumbnail``: uint8 array (RGB ``(S,S,3)`` for S1/S2, grey ``(S,S)`` for DEM) encoded by the writer,
    or already-encoded image bytes stored as they are; unset, it is made from the band arrays with the
    published recipe (``thumbnails.thumbnail_for``: S2 B04/B03/B02, S1 vv/vh, DEM hillshade).
    ``bands``: name -> 2-D array (encoded as single-band GeoTIFF) or GeoTIFF bytes; names are the
    published columns (``B04``, ``vv``, ``DEM``, ``cloud_mask``...). Unset ``crs`` / ``centre_lat`` /
    ``centre_lon`` come from the grid cell.
    ``origin`` is the raster's upper-left corner in the CRS (m) for band GeoTIFFs; unset, it follows the
    published footprint rule (bottom-left grid point projected, minus 340 m / plus 10,340 m).
    """

    grid_cell: str
    thumbnail: np.ndarray | bytes | None = None
    bands: Mapping[str, np.ndarray | bytes] | None = None
    product_id: str | None = None
    timestamp: datetime | pd.Timestamp | str | None = None
    cloud_cover: float | None = None
    nodata: float = 0.0
    crs: str | int | None = None
    centre_lat: float | None = None
    centre_lon: float | None = None
    orbit_state: str | None = None
    origin: tuple[float, float] | None = None
    min_val: float | None = None
    max_val: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WriteSummary:
    """What a writer produced."""

    modality: Modality
    dataset_url: str
    metadata_url: str
    part_urls: tuple[str, ...]
    rows: int


class MajorTomWriter:
    """Streaming writer for one modality; holds one open part file and the (small) metadata rows."""

    def __init__(
        self,
        root: str,
        modality: Modality | str,
        *,
        rows_per_part: int = 500,
        include_bands: bool = True,
        thumbnail_format: str | None = None,
        band_compression: str | None = "zlib",
        parquet_url_prefix: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        filesystem: AbstractFileSystem | None = None,
        overwrite: bool = False,
        extra_columns: Iterable[tuple[str, pa.DataType]] = (),
    ) -> None:
        """Args:
        root: folder that holds (or will hold) the ``Core-*`` datasets; URL or local path.
        rows_per_part: samples per ``images/part_NNNNN.parquet`` (published: ~500).
        include_bands: False writes thumbnails only (no band / cloud-mask / compressed columns).
        thumbnail_format: ``"png"``, ``"jpeg"``...; default: what the published dataset uses.
        parquet_url_prefix: what ``parquet_url`` starts with (default: this dataset's own URL);
            ``"hf"`` writes the published Hugging Face URLs.
        extra_columns: metadata columns after the published ones, filled from ``CellRecord.extra``
            (exports add origin and provenance; readers of the published layout ignore them).
        """
        if rows_per_part < 1:
            raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
        self.modality = Modality.parse(modality)
        self.layout: ModalityLayout = layout(self.modality)
        self.rows_per_part = rows_per_part
        self.include_bands = include_bands
        self.thumbnail_format = thumbnail_format or self.layout.default_thumbnail_format
        self.band_compression = band_compression
        self._extra_columns = tuple((str(n), t) for n, t in extra_columns)
        clash = {n for n, _ in self._extra_columns} & set(self.layout.metadata_schema.names)
        if clash:
            raise ValueError(f"extra_columns {sorted(clash)} are published columns of {self.layout.dataset}")
        self._metadata_schema = pa.schema([*self.layout.metadata_schema, *(pa.field(n, t)
                                                                          for n, t in self._extra_columns)])
        dataset_url = fsutil.join_url(root, self.layout.dataset)
        self._fs, self._dataset_path = fsutil.url_to_fs(dataset_url, storage_options, filesystem)
        self.dataset_url = fsutil.full_url(self._fs, self._dataset_path)
        if parquet_url_prefix == "hf":
            parquet_url_prefix = HF_URL_PREFIX.format(dataset=self.layout.dataset)
        self._url_prefix = (parquet_url_prefix or self.dataset_url).rstrip("/")
        self._check_target(overwrite)
        self._schema = self.layout.image_schema(include_bands)
        self._metadata: list[dict[str, Any]] = []
        self._part_urls: list[str] = []
        self._part_index = 0
        self._rows_in_part = 0
        self._file = None
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[dict[str, Any]] = []  # image rows not yet written (bounded by _FLUSH_BYTES)
        self._pending_bytes = 0
        self._closed = False

    # -- public -------------------------------------------------------------------------------------

    def write(self, record: CellRecord) -> tuple[str, int]:
        """Append one sample (one row group); returns its ``(parquet_url, parquet_row)``."""
        if self._closed:
            raise RuntimeError(f"{self.layout.dataset}: writer is closed")
        meta = self._metadata_row(record)
        image_row = self._image_row(record)
        if self._writer is None or self._rows_in_part >= self.rows_per_part:
            self._open_next_part()
        self._pending.append(image_row)
        self._pending_bytes += sum(len(v) for v in image_row.values() if isinstance(v, bytes))
        if self._pending_bytes >= _FLUSH_BYTES:
            self._flush()
        meta["parquet_url"] = f"{self._url_prefix}/{IMAGES_DIR}/{part_name(self._part_index)}"
        meta["parquet_row"] = self._rows_in_part
        if "__index_level_0__" in self.layout.metadata_schema.names:
            meta["__index_level_0__"] = len(self._metadata)
        self._metadata.append(meta)
        self._rows_in_part += 1
        return meta["parquet_url"], meta["parquet_row"]

    def write_all(self, records: Iterable[CellRecord]) -> int:
        """Write every record; returns how many."""
        n = 0
        for record in records:
            self.write(record)
            n += 1
        return n

    def close(self) -> WriteSummary:
        """Finish the open part and write ``metadata.parquet``."""
        if not self._closed:
            self._close_part()
            table = pa.Table.from_pylist(self._metadata, schema=self._metadata_schema)
            with self._fs.open(f"{self._dataset_path}/{METADATA_FILE}", "wb") as f:
                pq.write_table(table, f, compression="snappy")
            self._closed = True
        return WriteSummary(
            modality=self.modality,
            dataset_url=self.dataset_url,
            metadata_url=f"{self.dataset_url}/{METADATA_FILE}",
            part_urls=tuple(self._part_urls),
            rows=len(self._metadata),
        )

    def abort(self) -> None:
        """Close the open part without writing metadata (the dataset stays unreadable, never half-valid)."""
        self._pending = []
        self._close_part()
        self._closed = True

    def __enter__(self) -> MajorTomWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals ----------------------------------------------------------------------------------

    def _check_target(self, overwrite: bool) -> None:
        meta = f"{self._dataset_path}/{METADATA_FILE}"
        images = f"{self._dataset_path}/{IMAGES_DIR}"
        if not overwrite and (self._fs.exists(meta) or self._fs.exists(images)):
            raise FileExistsError(
                f"{self.layout.dataset} already exists at {fsutil.redact_url(self.dataset_url)}; "
                "pass overwrite=True to replace it"
            )
        if overwrite and self._fs.exists(images):
            self._fs.rm(images, recursive=True)
        self._fs.makedirs(images, exist_ok=True)

    def _open_next_part(self) -> None:
        self._close_part()
        self._part_index += 1
        path = f"{self._dataset_path}/{IMAGES_DIR}/{part_name(self._part_index)}"
        self._file = self._fs.open(path, "wb")
        binary = set(self.layout.binary_columns)
        compression = {n: ("none" if n in binary else "snappy") for n in self._schema.names}
        self._writer = pq.ParquetWriter(
            self._file,
            self._schema,
            compression=compression,  # image bytes are already compressed
            write_statistics=[n for n in self._schema.names if n not in binary],
            write_page_checksum=True,  # readers verify page CRCs (storage/majortom/reader.py)
        )
        self._part_urls.append(fsutil.full_url(self._fs, path))
        self._rows_in_part = 0

    def _flush(self) -> None:
        """Write the buffered samples, one row group each (batched: one Arrow table per flush)."""
        if self._pending:
            assert self._writer is not None
            table = pa.Table.from_pylist(self._pending, schema=self._schema)
            self._writer.write_table(table, row_group_size=1)  # one sample per row group, as published
            self._pending, self._pending_bytes = [], 0

    def _close_part(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _fail(self, record: CellRecord, field_name: str, reason: str) -> RecordError:
        return RecordError(self.layout.dataset, str(record.grid_cell), field_name, reason)

    def _metadata_row(self, r: CellRecord) -> dict[str, Any]:
        from copgen.storage.majortom import grid

        try:
            row_u, col_r = grid.parse_cell(r.grid_cell)
        except Exception as exc:  # GridError, or a non-string
            raise self._fail(r, "grid_cell", str(exc)) from exc
        names = self.layout.metadata_schema.names
        out: dict[str, Any] = {"grid_cell": r.grid_cell, "grid_row_u": int(row_u), "grid_col_r": int(col_r)}
        try:
            out["crs"] = _crs_string(r.crs if r.crs is not None else _grid_epsg(r.grid_cell))
        except ValueError as exc:
            raise self._fail(r, "crs", str(exc)) from exc
        if r.centre_lat is None or r.centre_lon is None:  # the published rule: cell centre in the row's CRS
            lat, lon = grid.cell_centre(r.grid_cell, _epsg_number(out["crs"]))
        else:
            lat, lon = r.centre_lat, r.centre_lon
        out["centre_lat"], out["centre_lon"] = float(lat), float(lon)
        if not (0.0 <= float(r.nodata) <= 1.0):
            raise self._fail(r, "nodata", f"fraction {r.nodata} outside [0, 1]")
        out["nodata"] = float(r.nodata)
        if "product_id" in names:
            if not r.product_id:
                raise self._fail(r, "product_id", "required for this dataset")
            out["product_id"] = str(r.product_id)
        if "timestamp" in names:
            out["timestamp"] = self._timestamp(r)
        if "cloud_cover" in names:
            if r.cloud_cover is None or not (0.0 <= float(r.cloud_cover) <= 100.0):
                raise self._fail(r, "cloud_cover", f"percentage in [0, 100] required, got {r.cloud_cover}")
            out["cloud_cover"] = float(r.cloud_cover)
        if "orbit_state" in names:
            out["orbit_state"] = r.orbit_state
        if "max_val" in names:
            out["min_val"], out["max_val"] = self._dem_range(r)
        for name, _ in self._extra_columns:
            out[name] = r.extra.get(name)
        return out

    def _timestamp(self, r: CellRecord) -> str:
        if r.timestamp is None:
            raise self._fail(r, "timestamp", "required for this dataset")
        try:
            if isinstance(r.timestamp, str) and len(r.timestamp) == 15:
                parsed = pd.Timestamp(datetime.strptime(r.timestamp, TIMESTAMP_FORMAT))
            else:
                parsed = pd.Timestamp(r.timestamp)
        except (ValueError, TypeError) as exc:
            raise self._fail(r, "timestamp", f"unreadable timestamp {r.timestamp!r}") from exc
        if pd.isna(parsed):
            raise self._fail(r, "timestamp", f"unreadable timestamp {r.timestamp!r}")
        if parsed.tzinfo is not None:  # stored strings are naive UTC, as published
            parsed = parsed.tz_convert("UTC").tz_localize(None)
        return parsed.strftime(TIMESTAMP_FORMAT)

    def _dem_range(self, r: CellRecord) -> tuple[float, float]:
        if r.min_val is not None and r.max_val is not None:
            return float(r.min_val), float(r.max_val)
        dem = (r.bands or {}).get("DEM")
        if isinstance(dem, np.ndarray):
            valid = dem[dem != _BAND_NODATA[Modality.DEM]]
            if valid.size:
                return float(valid.min()), float(valid.max())
        return math.nan, math.nan

    def _image_row(self, r: CellRecord) -> dict[str, Any]:
        row: dict[str, Any] = {"grid_cell": r.grid_cell}
        if "product_id" in self.layout.image_key_columns:
            row["product_id"] = str(r.product_id)
            row["product_datetime"] = self._timestamp(r)
        row["thumbnail"] = self._thumbnail_bytes(r)
        bands = dict(r.bands or {})
        unknown = sorted(set(bands) - set(self.layout.bands) - set(self.layout.extra_binary))
        if unknown:
            raise self._fail(r, unknown[0], f"not a column of {self.layout.dataset}")
        if self.include_bands:
            for name in self.layout.binary_columns[1:]:
                row[name] = self._band_bytes(r, name, bands.get(name))
        return row

    def _thumbnail_bytes(self, r: CellRecord) -> bytes:
        thumb = r.thumbnail
        if isinstance(thumb, bytes | bytearray | memoryview):
            return bytes(thumb)
        from copgen.storage.majortom.thumbnails import ThumbnailError, encode_thumbnail, thumbnail_for

        if thumb is None:
            arrays = {k: v for k, v in (r.bands or {}).items() if isinstance(v, np.ndarray)}
            if not arrays:
                raise self._fail(
                    r, "thumbnail", "a thumbnail (array or image bytes) or band arrays are required"
                )
            try:  # the published thumbnail recipe of this modality, from its bands
                thumb = thumbnail_for(
                    self.modality, arrays, context={"dataset": self.layout.dataset, "cell": r.grid_cell}
                )
            except ThumbnailError as exc:
                raise self._fail(r, "thumbnail", f"cannot derive the thumbnail from bands: {exc}") from exc
        arr = np.asarray(thumb)
        if arr.dtype != np.uint8:
            raise self._fail(r, "thumbnail", f"expected uint8 pixels, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        channels = 1 if arr.ndim == 2 else arr.shape[2]
        square = arr.ndim in (2, 3) and arr.shape[0] == arr.shape[1]
        if not square or channels != self.layout.thumbnail_channels:
            want = "(S, S)" if self.layout.thumbnail_channels == 1 else "(S, S, 3)"
            raise self._fail(r, "thumbnail", f"expected a square {want} image, got shape {arr.shape}")
        try:
            return encode_thumbnail(arr, format=self.thumbnail_format)
        except ThumbnailError as exc:
            raise self._fail(r, "thumbnail", str(exc)) from exc

    def _band_bytes(self, r: CellRecord, name: str, value: np.ndarray | bytes | None) -> bytes | None:
        if value is None or isinstance(value, bytes | bytearray | memoryview):
            return None if value is None else bytes(value)
        arr = np.asarray(value)
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
            raise self._fail(r, name, f"expected a square 2-D band, got shape {arr.shape}")
        epsg = _epsg_number(r.crs if r.crs is not None else _grid_epsg(r.grid_cell))
        nodata = None if name in ("cloud_mask", "compressed") else _BAND_NODATA[self.modality]
        origin = r.origin
        if origin is None:  # the published footprint: upper-left of [x0-340, y0+10340] in the row's CRS
            from copgen.storage.majortom import grid

            xmin, _, _, ymax = grid.sample_footprint(r.grid_cell, epsg).bounds
            origin = (xmin, ymax)
        try:
            return geotiff.encode_band(
                arr, epsg=epsg, origin=origin, nodata=nodata, compression=self.band_compression
            )
        except geotiff.GeoTiffError as exc:
            raise self._fail(r, name, str(exc)) from exc


def write_dataset(
    root: str, modality: Modality | str, records: Iterable[CellRecord], **options: Any
) -> WriteSummary:
    """Write one modality's dataset from ``records`` (see ``MajorTomWriter`` for ``options``)."""
    with MajorTomWriter(root, modality, **options) as writer:
        writer.write_all(records)
    return writer.close()


def _grid_epsg(cell: str) -> int:
    from copgen.storage.majortom import grid

    return _epsg_number(grid.cell_utm_epsg(cell))


def _epsg_number(crs: str | int) -> int:
    if isinstance(crs, int | np.integer):
        return int(crs)
    text = str(crs).upper().replace("EPSG:", "")
    if not text.isdigit():
        raise ValueError(f"unreadable CRS {crs!r}; expected 'EPSG:<code>' or an integer code")
    return int(text)


def _crs_string(crs: str | int) -> str:
    return f"EPSG:{_epsg_number(crs)}"


def synthetic_records(
    modality: Modality | str,
    cells: Iterable[str],
    *,
    thumbnail_size: int | None = None,
    bands: bool = False,
    seed: int = 0,
    start: str = "2023-01-01T00:00:00",
) -> Iterable[CellRecord]:
    """Deterministic synthetic records (smooth random fields + noise) for tests, benchmarks and demos.

    Thumbnails compress like real imagery (not like white noise). S2 timestamps step one day per cell;
    S1 times sit within +-7 days of them (the published average S1-S2 shift), DEM has none.
    ``bands=True`` adds every band of the layout, scaled with ``thumbnail_size``.
    """
    import zlib

    from PIL import Image

    m = Modality.parse(modality)
    lay = layout(m)
    size = thumbnail_size or lay.thumbnail_size
    t0 = pd.Timestamp(start)
    for i, cell in enumerate(cells):
        rng = np.random.default_rng([seed, int(m), zlib.crc32(cell.encode())])
        coarse = rng.integers(0, 256, size=(6, 6, lay.thumbnail_channels), dtype=np.uint8)
        mode = "L" if lay.thumbnail_channels == 1 else "RGB"
        smooth = np.asarray(
            Image.fromarray(coarse[..., 0] if mode == "L" else coarse, mode).resize(
                (size, size), Image.BILINEAR
            )
        )
        noise = rng.integers(-6, 7, size=smooth.shape)
        thumb = np.clip(smooth.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        when = t0 + pd.Timedelta(days=i)
        if m == Modality.S1RTC:
            when += pd.Timedelta(hours=float(rng.uniform(-168, 168)))
        record = CellRecord(
            grid_cell=cell,
            thumbnail=thumb,
            product_id=None if m == Modality.DEM else f"SYN_{m.name}_{cell}_{when:%Y%m%dT%H%M%S}",
            timestamp=None if m == Modality.DEM else when.floor("s"),
            cloud_cover=float(np.round(rng.uniform(0, 100), 2))
            if "cloud_cover" in lay.metadata_schema.names
            else None,
            nodata=0.0,
            orbit_state=("ASCENDING", "DESCENDING")[int(rng.integers(2))] if m == Modality.S1RTC else None,
        )
        if bands:
            arrays: dict[str, np.ndarray] = {}
            for name in (*lay.bands, *lay.extra_binary):
                if name == "compressed":
                    continue
                side = max(2, round(lay.band_pixels[name] * size / lay.thumbnail_size))
                dtype = lay.band_dtype.get(name, "uint8")
                high = 4 if name == "cloud_mask" else 10_000
                arrays[name] = rng.integers(0, high, size=(side, side)).astype(dtype)
            record.bands = arrays
        yield record
