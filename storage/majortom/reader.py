"""Read Major TOM Core datasets (published parquet layout) from a local folder, S3 or the hub, via fsspec.

A source is either a root URL holding ``Core-*`` folders (``/data/majortom``, ``s3://bucket/world``,
``hf://datasets/Major-TOM``) or one URL per modality (``{"S2L2A": "hf://datasets/Major-TOM/Core-S2L2A"}``).

Metadata -> per-modality frames (only the needed columns) -> row checks -> filters -> de-duplication ->
pairing by grid cell (:meth:`MajorTomReader.pair`). Samples are fetched by reading ONE row group and only
the needed columns of a cached ``ParquetFile`` per part (:meth:`MajorTomReader.read_samples`).

De-duplication rule (the published S2L2A metadata repeats ~7k cells, research §5), applied per modality
after filtering: rows are ranked by timestamp (most recent first), cloud cover (lowest first), nodata
(lowest first), product id, parquet file, parquet row (ascending); the first row per grid cell is kept.
The rank is a total order on distinct rows, so the result does not depend on the input row order.

Bad input raises :class:`SourceError` (its message names dataset, file, metadata row / row group, cell and
field) or, with ``on_error="skip"``, is returned as :class:`BadSample` records while the rest is read.
Dataset-level failures (missing or unreadable ``metadata.parquet``, missing metadata columns) always raise:
skipping them would make every cell look like it lacks that modality.

A reader caches open files; it is not thread-safe (use one per thread / Dask task).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from copgen.errors import CopgenError, StorageUnavailableError, unreachable
from copgen.modalities import Modality
from copgen.records import CellRecord, SourceRef, TileRef
from copgen.storage import fsutil
from copgen.storage.majortom import geotiff, grid
from copgen.storage.majortom.layout import (
    IMAGES_DIR,
    LAYOUTS,
    METADATA_FILE,
    TIMESTAMP_FORMAT,
    ModalityLayout,
    layout,
)
from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
# Where a pair's centre comes from when several modalities have the cell (optical first: the Core sets).
CENTRE_PRIORITY = (Modality.S2L2A, Modality.S2L1C, Modality.S1RTC, Modality.DEM)
_BBOX_MARGIN_DEG = 0.05  # pre-filter margin: centres of one cell differ by < 100 m between CRSs
_PART_RE = r"(?:^|/)" + IMAGES_DIR + r"/(?P<part>part_\d{5}\.parquet)(?:\?.*)?$"
_CELL_RE = f"^{grid.CELL_PATTERN}$"


class SourceError(CopgenError):
    """Bad Major TOM input; the attributes and the message say where (dataset, file, row, cell, field)."""

    def __init__(
        self,
        reason: str,
        *,
        dataset: str | None = None,
        file: str | None = None,
        row_group: int | None = None,
        cell: str | None = None,
        field: str | None = None,
        metadata_row: int | None = None,
    ) -> None:
        self.reason, self.dataset, self.file, self.row_group = reason, dataset, file, row_group
        self.cell, self.field, self.metadata_row = cell, field, metadata_row
        where = [dataset or "Major TOM"]
        if file:
            where.append(f"file {fsutil.redact_url(file)}")
        if metadata_row is not None:
            where.append(f"metadata row {metadata_row}")
        if row_group is not None:
            where.append(f"row group {row_group}")
        if cell:
            where.append(f"cell {cell}")
        if field:
            where.append(f"field {field!r}")
        super().__init__(", ".join(where) + ": " + reason)

    def record(self) -> BadSample:
        """This error as a skip-mode record."""
        return BadSample(
            dataset=self.dataset or "",
            grid_cell=self.cell,
            file=fsutil.redact_url(self.file) if self.file else None,
            row_group=self.row_group,
            field=self.field,
            reason=self.reason,
            metadata_row=self.metadata_row,
        )


@dataclass(frozen=True)
class BadSample:
    """A sample or metadata row that could not be used, and why (skip mode)."""

    dataset: str
    grid_cell: str | None
    file: str | None
    row_group: int | None
    field: str | None
    reason: str
    metadata_row: int | None = None
    # A rejected metadata row's image location (when it was readable): lets the caller find the cell the
    # row describes even when its grid_cell is broken (``MajorTomReader.cell_of_image``).
    image_file: str | None = None
    image_row: int | None = None


@dataclass(frozen=True)
class MetadataFilter:
    """Row filters; every bound is inclusive, ``None`` disables it.

    ``bbox`` = (min_lon, min_lat, max_lon, max_lat) on the cell centre; min_lon > max_lon wraps across the
    antimeridian. ``start``/``end`` apply to timestamped modalities (S1, S2; naive times are UTC).
    ``max_cloud_cover`` (percent) applies to S2; ``max_nodata`` (fraction) to all. ``cells``: an
    allow-list of grid cell ids. Rows failing a filter are dropped before de-duplication, so a cell can
    keep an older clear S2 row when its newest one is cloudy.
    """

    bbox: tuple[float, float, float, float] | None = None
    start: datetime | str | None = None
    end: datetime | str | None = None
    max_cloud_cover: float | None = None
    max_nodata: float | None = None
    cells: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.bbox is not None:
            min_lon, min_lat, max_lon, max_lat = self.bbox
            if not (-90 <= min_lat <= max_lat <= 90 and -180 <= min_lon <= 180 and -180 <= max_lon <= 180):
                raise ValueError(
                    f"bbox must be (min_lon, min_lat, max_lon, max_lat) in degrees, got {self.bbox}"
                )
        if self.cells is not None and not isinstance(self.cells, frozenset):
            object.__setattr__(self, "cells", frozenset(self.cells))


@dataclass(frozen=True)
class DedupReport:
    """Rows dropped by de-duplication in one modality: same image twice, or several images of one cell."""

    modality: Modality
    rows_in: int
    same_image: int  # identical (grid_cell, parquet file, parquet row)
    same_cell: int  # other rows of a cell that kept a better one

    @property
    def dropped(self) -> int:
        return self.same_image + self.same_cell


@dataclass
class ModalityMetadata:
    """One modality's checked, filtered, de-duplicated metadata (one row per grid cell). In a
    :class:`Pairing` the frame keeps only its header: the ``pairs`` table holds the rows (memory)."""

    modality: Modality
    frame: pd.DataFrame
    rows_read: int
    dedup: DedupReport
    bad: list[BadSample] = field(default_factory=list)


class PairsTable:
    """The complete / incomplete split of a ``pairs`` table (Major TOM pairing and GeoTIFF tile folders)."""

    pairs: pd.DataFrame

    @property
    def complete(self) -> pd.DataFrame:
        return self.pairs[self.pairs["complete"]].reset_index(drop=True)

    @property
    def incomplete(self) -> pd.DataFrame:
        """Cells missing at least one modality: the completion job's input."""
        return self.pairs[~self.pairs["complete"]].reset_index(drop=True)


@dataclass
class Pairing(PairsTable):
    """Cells paired across modalities, ordered by (grid_row_u, grid_col_r).

    ``pairs`` columns: ``grid_cell, grid_row_u, grid_col_r, centre_lat, centre_lon, n_present, complete,
    missing`` (comma-separated modality names), then per modality M: ``M_present, M_product_id,
    M_timestamp, M_cloud_cover, M_nodata, M_crs, M_file, M_row``, then ``s1_s2_gap_hours`` = S1 time
    minus S2 time (S2L2A, else S2L1C) in hours, NaN when either is absent.
    """

    pairs: pd.DataFrame
    modalities: tuple[Modality, ...]
    metadata: dict[Modality, ModalityMetadata]
    bad: list[BadSample]

    @property
    def duplicates_dropped(self) -> dict[Modality, int]:
        return {m: md.dedup.dropped for m, md in self.metadata.items()}

    def cells(self, pairs: pd.DataFrame | None = None) -> list[CellRecord]:
        """The typed records of ``pairs`` (default: every paired cell), one per row, in row order."""
        return cell_records(self.pairs if pairs is None else pairs, self.modalities)


# Where one sample lives (image parquet file and row group): the shared record type.
SampleRef = SourceRef


@dataclass
class Sample:
    """One fetched sample: the decoded thumbnail and/or bands."""

    ref: SampleRef
    thumbnail: np.ndarray | None = None
    bands: dict[str, np.ndarray] = field(default_factory=dict)
    band_geo: dict[str, geotiff.GeoInfo] = field(default_factory=dict)

    @property
    def grid_cell(self) -> str:
        return self.ref.grid_cell


@dataclass
class FetchResult:
    """Samples read (input order) and, in skip mode, the ones that failed."""

    samples: list[Sample]
    bad: list[BadSample]

    @property
    def thumbnails(self) -> dict[str, np.ndarray]:
        """grid_cell -> thumbnail, in input order."""
        return {s.grid_cell: s.thumbnail for s in self.samples if s.thumbnail is not None}


PUBLISHED_THUMBNAIL_SIZES: dict[Modality, int] = {m: lay.thumbnail_size for m, lay in LAYOUTS.items()}


class MajorTomReader:
    """Open Major TOM Core datasets and read metadata, pairs and samples from them."""

    def __init__(
        self,
        root: str | None = None,
        *,
        urls: Mapping[Modality | str, str] | None = None,
        modalities: Iterable[Modality | str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        filesystem: AbstractFileSystem | None = None,
        on_error: OnError = "raise",
        thumbnail_sizes: Mapping[Modality | str, int | None] | None = None,
        resolve_parquet_urls: Literal["relative", "as-is"] = "relative",
        max_open_files: int = 32,
    ) -> None:
        """Args:
        root: folder holding ``Core-*`` datasets. Without ``modalities``, the ones found there are used.
        urls: per-modality dataset URLs (instead of, or on top of, ``root``).
        modalities: the modalities to read; each must exist.
        storage_options: fsspec options (s3fs ``key``/``secret``/``client_kwargs``...); never logged.
        filesystem: an fsspec filesystem to use for every URL instead of building one.
        on_error: default for every call: ``"raise"`` a SourceError, or ``"skip"`` and record.
        thumbnail_sizes: expected thumbnail side per modality (default: published 1068 / DEM 356);
            ``None`` for a modality disables the check.
        resolve_parquet_urls: ``"relative"`` (default) reads ``images/part_NNNNN.parquet`` next to the
            metadata it came from, whatever host ``parquet_url`` names (mirrors of the hub work);
            ``"as-is"`` opens ``parquet_url`` itself.
        max_open_files: how many part files stay open (LRU).
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if resolve_parquet_urls not in ("relative", "as-is"):
            raise ValueError(
                f"resolve_parquet_urls must be 'relative' or 'as-is', got {resolve_parquet_urls!r}"
            )
        self.on_error: OnError = on_error
        self.resolve_parquet_urls = resolve_parquet_urls
        self._storage_options = dict(storage_options or {})
        self._filesystem = filesystem
        self._max_open = max(1, int(max_open_files))
        self._open: OrderedDict[str, tuple[Any, pq.ParquetFile]] = OrderedDict()
        self._columns: dict[str, frozenset[str]] = {}  # column names per open part
        self._broken: dict[str, str] = {}  # file -> why it could not be opened (fail fast on the rest)
        self.thumbnail_sizes: dict[Modality, int | None] = dict(PUBLISHED_THUMBNAIL_SIZES)
        for key, size in (thumbnail_sizes or {}).items():
            self.thumbnail_sizes[Modality.parse(key)] = size
        self.dataset_urls = self._locate(root, urls, modalities)
        self.modalities: tuple[Modality, ...] = tuple(sorted(self.dataset_urls))

    # -- source discovery ---------------------------------------------------------------------------

    def _fs(self, url: str) -> tuple[AbstractFileSystem, str]:
        return fsutil.url_to_fs(url, self._storage_options, self._filesystem)

    def _exists(self, url: str) -> bool:
        try:
            fs, path = self._fs(url)
            return bool(fs.exists(path))
        except Exception as exc:  # network / credential errors from any fsspec backend
            _raise_if_unreachable(exc, url)  # an outage (exit 4) keeps its kind across processes
            raise SourceError(f"cannot reach {fsutil.redact_url(url)}: {type(exc).__name__}: {exc}") from exc

    def _locate(self, root, urls, modalities) -> dict[Modality, str]:
        wanted = None if modalities is None else {Modality.parse(m) for m in modalities}
        found: dict[Modality, str] = {}
        for key, url in (urls or {}).items():
            found[Modality.parse(key)] = url.rstrip("/")
        if root is not None:
            for m in Modality:
                if m in found or (wanted is not None and m not in wanted):
                    continue
                url = fsutil.join_url(root, m.dataset)
                if wanted is not None or self._exists(fsutil.join_url(url, METADATA_FILE)):
                    found[m] = url
        if wanted is not None:
            missing = wanted - set(found)
            if missing:
                names = ", ".join(m.name for m in sorted(missing))
                raise SourceError(f"no dataset URL for {names}: give root= or urls=")
            found = {m: u for m, u in found.items() if m in wanted}
        if not found:
            where = fsutil.redact_url(root) if root else "the given urls"
            raise SourceError(f"no Core-* dataset with a {METADATA_FILE} found under {where}")
        return found

    # -- metadata -----------------------------------------------------------------------------------

    def read_metadata(
        self,
        modality: Modality | str,
        filters: MetadataFilter | None = None,
        *,
        dedup: bool = True,
        on_error: OnError | None = None,
    ) -> ModalityMetadata:
        """Read, check, filter and de-duplicate one modality's metadata (one row per grid cell).

        Frame columns: ``grid_cell, grid_row_u, grid_col_r, product_id, timestamp (UTC), cloud_cover,
        nodata, centre_lat, centre_lon, crs, parquet_url, parquet_file (resolved URL), parquet_row,
        metadata_row``. With ``dedup=False`` several rows for one cell are an error (raised or skipped).
        """
        m = Modality.parse(modality)
        mode = self._mode(on_error)
        lay = layout(m)
        url = fsutil.join_url(self._dataset_url(m), METADATA_FILE)
        table = self._read_metadata_table(lay, url)
        frame = self._normalise(lay, table)
        rows_read = len(frame)
        bad: list[BadSample] = []
        frame = self._check_rows(lay, url, frame, table, mode, bad)
        del table
        if filters is not None:
            frame = _apply_filters(frame, filters, margin=_BBOX_MARGIN_DEG)
        if dedup:
            frame, report = _deduplicate(m, frame)
        else:
            frame = self._reject_duplicates(lay, url, frame, mode, bad)
            report = DedupReport(m, len(frame), 0, 0)
        return ModalityMetadata(m, frame.reset_index(drop=True), rows_read, report, bad)

    def _dataset_url(self, m: Modality) -> str:
        if m not in self.dataset_urls:
            raise SourceError(
                f"{m.dataset} is not part of this source ({', '.join(x.name for x in self.modalities)})"
            )
        return self.dataset_urls[m]

    def _read_metadata_table(self, lay: ModalityLayout, url: str) -> pa.Table:
        wanted = [n for n in lay.metadata_schema.names if n not in ("orbit_state", "max_val", "min_val")]
        wanted = [n for n in wanted if not n.startswith("__")]
        optional = {"grid_row_u", "grid_col_r"}  # derivable from grid_cell; checked when present
        fs, path = self._fs(url)
        try:
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = set(pf.schema_arrow.names)
                missing = [n for n in wanted if n not in names and n not in optional]
                if missing:
                    raise SourceError(
                        f"metadata lacks column(s) {missing}; it has {sorted(names)}",
                        dataset=lay.dataset,
                        file=url,
                        field=missing[0],
                    )
                return pf.read(columns=[n for n in wanted if n in names])
        except SourceError:
            raise
        except FileNotFoundError as exc:
            raise SourceError("metadata file not found", dataset=lay.dataset, file=url) from exc
        except (pa.ArrowException, OSError, ValueError) as exc:
            _raise_if_unreachable(exc, url)
            raise SourceError(f"unreadable metadata parquet ({exc})", dataset=lay.dataset, file=url) from exc

    def _normalise(self, lay: ModalityLayout, table: pa.Table) -> pd.DataFrame:
        """Published columns -> the reader's frame; parsing runs in Arrow compute (metadata has ~2M rows)."""
        n = table.num_rows

        def text(name: str) -> pa.ChunkedArray:
            return pc.cast(table.column(name), pa.string())

        def number(name: str) -> np.ndarray:
            column = table.column(name)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                column = _numbers_from_text(column)
            return pc.cast(column, pa.float64(), safe=False).to_numpy(zero_copy_only=False)

        cell = text("grid_cell")
        parts = pc.extract_regex(cell, _CELL_RE)
        matched = parts.is_valid().to_numpy(zero_copy_only=False)
        r_mag = pc.fill_null(pc.cast(pc.struct_field(parts, "r"), pa.int64()), 0).to_numpy(
            zero_copy_only=False
        )
        c_mag = pc.fill_null(pc.cast(pc.struct_field(parts, "c"), pa.int64()), 0).to_numpy(
            zero_copy_only=False
        )
        north = pc.fill_null(pc.equal(pc.struct_field(parts, "ns"), "U"), False).to_numpy(
            zero_copy_only=False
        )
        east = pc.fill_null(pc.equal(pc.struct_field(parts, "ew"), "R"), False).to_numpy(zero_copy_only=False)
        out = pd.DataFrame({"grid_cell": cell.to_pandas()})
        out["grid_row_u"] = np.where(north, r_mag, -r_mag).astype("int64")
        out["grid_col_r"] = np.where(east, c_mag, -c_mag).astype("int64")
        # no row "0D", no column "0L"
        out["_malformed"] = ~matched | (~north & (r_mag == 0)) | (~east & (c_mag == 0))
        for name in ("grid_row_u", "grid_col_r"):
            if name in table.column_names:
                out["_stored_" + name] = number(name)
        out["product_id"] = text("product_id").to_pandas() if "product_id" in table.column_names else None
        if "timestamp" in table.column_names:
            out["timestamp"] = _parse_timestamps(table.column("timestamp"))
        else:
            out["timestamp"] = pd.Series(pd.NaT, index=out.index, dtype="datetime64[s, UTC]")
        out["cloud_cover"] = number("cloud_cover") if "cloud_cover" in table.column_names else np.nan
        out["nodata"] = number("nodata")
        out["centre_lat"] = number("centre_lat")
        out["centre_lon"] = number("centre_lon")
        out["crs"] = pc.replace_substring_regex(text("crs"), r"^(?:EPSG:)+", "EPSG:").to_pandas()
        url = text("parquet_url")
        out["parquet_url"] = url.to_pandas()
        out["parquet_row"] = number("parquet_row")
        if self.resolve_parquet_urls == "relative":
            part = pc.struct_field(pc.extract_regex(url, _PART_RE), "part")
            base = self._dataset_url(lay.modality).rstrip("/") + f"/{IMAGES_DIR}/"
            out["parquet_file"] = pc.binary_join_element_wise(base, part, "").to_pandas()
        else:
            out["parquet_file"] = url.to_pandas()
        out["metadata_row"] = np.arange(n, dtype=np.int64)
        return out

    def _check_rows(
        self, lay, url, df: pd.DataFrame, raw: pa.Table, mode: OnError, bad: list[BadSample]
    ) -> pd.DataFrame:
        """Vectorised row checks; every failing row is one error, in metadata-row order."""
        checks = _row_checks(lay, df)
        drop = np.zeros(len(df), dtype=bool)
        errors: list[tuple[int, SourceError]] = []
        for name, mask, reason in checks:
            mask = mask & ~drop  # report each row once, for its first failing field
            for i in np.flatnonzero(mask):
                cell = _cell_text(df["grid_cell"].iat[i])
                if reason:
                    value = raw.column(name)[i].as_py() if name in raw.column_names else None
                    why = f"{reason} (value {value!r})"
                else:
                    why = _grid_reason(cell)
                errors.append(
                    (
                        int(i),
                        SourceError(
                            why, dataset=lay.dataset, file=url, metadata_row=int(i), cell=cell, field=name
                        ),
                    )
                )
            drop |= mask
        if errors:
            errors.sort(key=lambda e: e[0])
            if mode == "raise":
                raise errors[0][1]
            files, prows = df["parquet_file"], df["parquet_row"].to_numpy()
            for i, err in errors:
                rec = err.record()
                file, prow = files.iat[i], prows[i]
                if isinstance(file, str) and prow >= 0 and prow == np.floor(prow):
                    rec = replace(rec, image_file=file, image_row=int(prow))
                bad.append(rec)
            df = df[~drop]
        df = df.drop(columns=[c for c in df.columns if c.startswith("_")])
        df["parquet_row"] = df["parquet_row"].astype("int64")
        return df

    def _reject_duplicates(
        self, lay, url, df: pd.DataFrame, mode: OnError, bad: list[BadSample]
    ) -> pd.DataFrame:
        dup = df["grid_cell"].duplicated(keep=False).to_numpy()
        if not dup.any():
            return df
        counts = df["grid_cell"].map(df["grid_cell"].value_counts()).to_numpy()
        errors = [
            SourceError(
                f"{int(counts[i])} rows for this cell and dedup=False",
                dataset=lay.dataset,
                file=url,
                metadata_row=int(df["metadata_row"].iat[i]),
                cell=df["grid_cell"].iat[i],
                field="grid_cell",
            )
            for i in np.flatnonzero(dup)
        ]
        if mode == "raise":
            raise errors[0]
        bad.extend(e.record() for e in errors)
        return df[~dup]

    # -- pairing ------------------------------------------------------------------------------------

    def pair(
        self,
        filters: MetadataFilter | None = None,
        *,
        modalities: Iterable[Modality | str] | None = None,
        dedup: bool = True,
        on_error: OnError | None = None,
    ) -> Pairing:
        """Pair the modalities' metadata by grid cell: complete cells and cells missing some modalities."""
        mods = (
            self.modalities if modalities is None else tuple(sorted({Modality.parse(m) for m in modalities}))
        )
        metadata, frames = {}, {}
        for m in mods:  # one modality at a time, trimmed to what pairing keeps (bounded peak at scale)
            md = metadata[m] = self.read_metadata(m, filters, dedup=dedup, on_error=on_error)
            frames[m] = md.frame[[c for c in md.frame.columns if c not in ("parquet_url", "metadata_row")]]
            # the pairs table takes over the rows; the frame keeps its header, in a new empty frame (a
            # slice, even copied, would keep every row's Arrow string buffers alive)
            md.frame = pd.DataFrame(columns=md.frame.columns).astype(md.frame.dtypes)
        pairs = _pair_frames(frames, mods)
        if filters is not None and filters.bbox is not None:  # exact, on one centre per cell
            pairs = pairs[_in_bbox(pairs, filters.bbox, 0.0)].reset_index(drop=True)
        bad = [b for md in metadata.values() for b in md.bad]
        return Pairing(pairs=pairs, modalities=mods, metadata=metadata, bad=bad)

    def cell_of_image(self, modality: Modality | str, file: str, row_group: int) -> str | None:
        """The grid cell stored in an image row group (one small column read), or None when it cannot be
        read: identifies the cell of a metadata row whose own ``grid_cell`` is broken."""
        m = Modality.parse(modality)
        try:
            pf = self._parquet(SampleRef(m, "?", file, int(row_group)), layout(m))
            if not 0 <= row_group < pf.num_row_groups:
                return None
            value = pf.read_row_group(int(row_group), columns=["grid_cell"]).column("grid_cell")[0].as_py()
        except Exception:  # noqa: BLE001 - any failure just means: not attributable
            return None
        return value if isinstance(value, str) and _cell_on_grid(value) else None

    # -- samples ------------------------------------------------------------------------------------

    def refs(self, rows: pd.DataFrame, modality: Modality | str) -> list[SampleRef]:
        """Sample locations of ``modality`` in a pairs frame (present cells only) or a metadata frame."""
        m = Modality.parse(modality)
        if f"{m.name}_file" in rows:
            return [s for cell in cell_records(rows, (m,)) for s in cell.sources]
        if "parquet_file" not in rows:
            raise ValueError(
                f"rows must be a pairs frame (with {m.name}_file) or a metadata frame (parquet_file)"
            )
        cells, files, groups = rows["grid_cell"], rows["parquet_file"], rows["parquet_row"]
        return [SampleRef(m, c, f, int(g)) for c, f, g in zip(cells, files, groups, strict=True)]

    def fetch_thumbnails(
        self,
        rows: pd.DataFrame | Sequence[SampleRef],
        modality: Modality | str,
        *,
        on_error: OnError | None = None,
    ) -> FetchResult:
        """Decoded thumbnails (uint8) of ``modality`` for the rows; ``.thumbnails`` maps cell -> array."""
        refs = self.refs(rows, modality) if isinstance(rows, pd.DataFrame) else list(rows)
        return self.read_samples(refs, thumbnail=True, on_error=on_error)

    def read_sample(self, ref: SampleRef, *, thumbnail: bool = True, bands: Sequence[str] = ()) -> Sample:
        """Read one sample (one row group; only the thumbnail and the requested band columns)."""
        return self._read_one(ref, thumbnail, tuple(bands))

    def read_samples(
        self,
        refs: Sequence[SampleRef],
        *,
        thumbnail: bool = True,
        bands: Sequence[str] = (),
        on_error: OnError | None = None,
    ) -> FetchResult:
        """Read many samples; results keep input order. Files stay open between calls (LRU cache)."""
        mode = self._mode(on_error)
        samples: list[Sample] = []
        bad: list[BadSample] = []
        for ref in refs:
            try:
                samples.append(self._read_one(ref, thumbnail, tuple(bands)))
            except SourceError as exc:
                if mode == "raise":
                    raise
                bad.append(exc.record())
        return FetchResult(samples, bad)

    def _read_one(self, ref: SampleRef, want_thumbnail: bool, bands: tuple[str, ...]) -> Sample:
        lay = layout(ref.modality)

        def fail(reason: str, field_name: str | None = None) -> SourceError:
            return SourceError(
                reason,
                dataset=lay.dataset,
                file=ref.file,
                row_group=ref.row_group,
                cell=ref.grid_cell,
                field=field_name,
            )

        pf = self._parquet(ref, lay)
        if not 0 <= ref.row_group < pf.num_row_groups:
            raise fail(f"row group out of range: the file has {pf.num_row_groups}", "parquet_row")
        columns = ["grid_cell"] + (["thumbnail"] if want_thumbnail else []) + list(bands)
        names = self._columns[ref.file]
        for name in columns:
            if name not in names:
                raise fail(f"column missing from the image parquet (it has {sorted(names)})", name)
        try:
            table = pf.read_row_group(ref.row_group, columns=columns)
        except (pa.ArrowException, OSError, ValueError) as exc:
            _raise_if_unreachable(exc, ref.file)
            raise fail(f"unreadable row group (truncated or corrupt file?): {exc}") from exc
        if table.num_rows != 1:
            raise fail(f"row group holds {table.num_rows} rows; expected one sample per row group")
        stored_cell = table.column("grid_cell")[0].as_py()
        if stored_cell != ref.grid_cell:
            raise fail(f"row group holds cell {stored_cell!r}; metadata says {ref.grid_cell!r}", "grid_cell")
        sample = Sample(ref)
        if want_thumbnail:
            sample.thumbnail = self._decode_thumbnail(table.column("thumbnail")[0].as_py(), ref, fail)
        for name in bands:
            data = table.column(name)[0].as_py()
            if not data:
                raise fail("band is empty (null)", name)
            try:
                sample.bands[name], sample.band_geo[name] = geotiff.decode_band(data)
            except geotiff.GeoTiffError as exc:
                raise fail(str(exc), name) from exc
        return sample

    def _decode_thumbnail(self, data: bytes | None, ref: SampleRef, fail) -> np.ndarray:
        from copgen.storage.majortom.thumbnails import ThumbnailError, decode_thumbnail

        if not data:
            raise fail("thumbnail is empty (null)", "thumbnail")
        try:
            image = decode_thumbnail(data, context={"dataset": ref.modality.dataset, "cell": ref.grid_cell})
        except ThumbnailError as exc:
            raise fail(f"cannot decode image bytes: {exc}", "thumbnail") from exc
        expected = self.thumbnail_sizes.get(ref.modality)
        if expected is not None and image.shape[:2] != (expected, expected):
            raise fail(
                f"thumbnail is {image.shape[0]}x{image.shape[1]} px, expected {expected}x{expected}",
                "thumbnail",
            )
        return image

    def _parquet(self, ref: SampleRef, lay: ModalityLayout) -> pq.ParquetFile:
        key = ref.file
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key][1]
        if key in self._broken:
            raise SourceError(
                self._broken[key], dataset=lay.dataset, file=key, row_group=ref.row_group, cell=ref.grid_cell
            )
        fs, path = self._fs(key)
        handle = None
        try:
            # No read-ahead cache: pyarrow asks for exact byte ranges (footer, then one row group's chunks).
            handle = fs.open(path, "rb", cache_type="none")
            # Page CRCs are verified where the writer stored them (ours does; the published files may not).
            pf = pq.ParquetFile(handle, pre_buffer=True, page_checksum_verification=True)
        except Exception as exc:  # fsspec and pyarrow raise many types for missing / truncated files
            if handle is not None:
                handle.close()
            _raise_if_unreachable(exc, key)  # an outage is not a corrupt file: never quarantined, not cached
            missing = isinstance(exc, FileNotFoundError)
            reason = (
                "parquet file not found" if missing else f"not a readable parquet file (truncated?): {exc}"
            )
            self._broken[key] = reason
            raise SourceError(
                reason, dataset=lay.dataset, file=key, row_group=ref.row_group, cell=ref.grid_cell
            ) from exc
        self._open[key] = (handle, pf)
        self._columns[key] = frozenset(pf.schema_arrow.names)
        while len(self._open) > self._max_open:
            old_key, (old, _) = self._open.popitem(last=False)
            self._columns.pop(old_key, None)
            old.close()
        return pf

    # -- housekeeping -------------------------------------------------------------------------------

    def _mode(self, on_error: OnError | None) -> OnError:
        mode = on_error or self.on_error
        if mode not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {mode!r}")
        return mode

    def close(self) -> None:
        """Close every cached file."""
        while self._open:
            _, (handle, _) = self._open.popitem()
            handle.close()
        self._columns.clear()
        self._broken.clear()

    def __enter__(self) -> MajorTomReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- helpers


def _cell_text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _parse_timestamps(values: pa.ChunkedArray) -> pd.Series:
    """Published strings ``20230119T161811`` (or real timestamps) -> UTC datetimes; unreadable -> NaT."""
    if pa.types.is_timestamp(values.type):
        tz = values.type.tz
        utc = pc.cast(values, pa.timestamp(values.type.unit, tz="UTC")) if tz is None else values
        return utc.to_pandas().dt.tz_convert("UTC")
    text = pc.cast(values, pa.string())
    parsed = pc.strptime(text, format=TIMESTAMP_FORMAT, unit="s", error_is_null=True)
    out = pc.cast(parsed, pa.timestamp("s", tz="UTC")).to_pandas()
    other = out.isna().to_numpy() & text.is_valid().to_numpy(zero_copy_only=False)
    if other.any():  # tolerate ISO strings in a few rows
        raw = pd.Series(text.to_pandas()[other])
        out[other] = pd.to_datetime(raw, errors="coerce", utc=True, format="ISO8601").dt.as_unit("s")
    return out


def _numbers_from_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Numbers stored as text (seen in hand-made metadata): unparseable -> null, never an exception."""
    values = pd.to_numeric(pd.Series(column.to_pandas()), errors="coerce")
    return pa.chunked_array([pa.array(values.to_numpy(dtype="float64", na_value=np.nan))])


@functools.cache
def _column_ranges() -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) signed column of every grid row, indexed by row - lowest row."""

    lo_row, hi_row = grid.row_range()
    ranges = np.array([grid.column_range(r) for r in range(lo_row, hi_row + 1)], dtype=np.int64)
    return ranges[:, 0], ranges[:, 1]


def _row_checks(lay, df: pd.DataFrame) -> list[tuple[str, np.ndarray, str]]:
    """(field, failing-rows mask, reason) per check of a metadata frame, in reporting order; an empty
    reason means the grid explains the failure (``_grid_reason``)."""
    malformed = df["_malformed"].to_numpy()
    row_u, col_r = df["grid_row_u"].to_numpy(), df["grid_col_r"].to_numpy()
    # existence: rows within the grid, columns within their row's range (the shifted rows included)
    lo_row, hi_row = grid.row_range()
    in_rows = (row_u >= lo_row) & (row_u <= hi_row)
    col_lo, col_hi = _column_ranges()
    ri = np.where(in_rows, row_u - lo_row, 0)
    in_cols = (col_r >= col_lo[ri]) & (col_r <= col_hi[ri])
    unknown = ~malformed & ~(in_rows & in_cols)
    checks: list[tuple[str, np.ndarray, str]] = [
        ("grid_cell", malformed, "malformed grid cell id (expected e.g. '454U_120R')"),
        ("grid_cell", unknown, ""),  # the grid explains why
    ]
    for name in ("grid_row_u", "grid_col_r"):
        if "_stored_" + name in df:
            stored = df["_stored_" + name].to_numpy()
            checks.append(
                (name, ~malformed & (stored != df[name].to_numpy()), f"{name} disagrees with grid_cell")
            )
    if lay.has_timestamp:
        checks.append(("timestamp", df["timestamp"].isna().to_numpy(), "unreadable timestamp"))
    parquet_row = df["parquet_row"].to_numpy()
    row_bad = ~(parquet_row >= 0) | (parquet_row != np.floor(parquet_row))
    checks.append(("parquet_row", row_bad, "parquet_row must be a non-negative integer"))
    url_bad = df["parquet_file"].isna().to_numpy()
    checks.append(("parquet_url", url_bad, "parquet_url names no images/part_NNNNN.parquet"))
    lat, lon = df["centre_lat"].to_numpy(), df["centre_lon"].to_numpy()
    off_earth = ~((lat >= -90) & (lat <= 90) & (lon >= -180) & (lon <= 180))
    checks.append(("centre_lat", off_earth, "centre outside lat/lon range"))
    nodata = df["nodata"].to_numpy()
    checks.append(("nodata", ~((nodata >= 0) & (nodata <= 1)), "nodata fraction outside [0, 1]"))
    if "cloud_cover" in lay.metadata_schema.names:
        cc = df["cloud_cover"].to_numpy()
        checks.append(("cloud_cover", ~((cc >= 0) & (cc <= 100)), "cloud_cover outside [0, 100]"))
    return checks


def _raise_if_unreachable(exc: BaseException, url: str) -> None:
    """Storage that cannot be reached is infrastructure (exit 4, the block is retried), not bad input."""
    cause = unreachable(exc)
    if isinstance(cause, StorageUnavailableError):  # storage/retry.py gave up; its line names the object
        raise cause  # (Python cuts the context cycle: cause is inside exc)
    if cause is not None:
        raise StorageUnavailableError(
            f"storage unreachable while reading {fsutil.redact_url(url)}: {type(cause).__name__}: {cause}"
        ) from exc


def _cell_on_grid(cell: str) -> bool:
    from copgen.storage.majortom import grid

    try:
        grid.parse_cell(cell)
    except grid.GridError:
        return False
    return True


def _grid_reason(cell: str | None) -> str:

    try:
        grid.parse_cell(cell)
    except grid.GridError as exc:
        return str(exc)
    return "cell not in the grid"


def _utc(value: datetime | str | None) -> pd.Timestamp | None:
    if value is None:
        return None
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _in_bbox(df: pd.DataFrame, bbox: tuple[float, float, float, float], margin: float) -> np.ndarray:
    min_lon, min_lat, max_lon, max_lat = bbox
    lat, lon = df["centre_lat"].to_numpy(), df["centre_lon"].to_numpy()
    ok = (lat >= min_lat - margin) & (lat <= max_lat + margin)
    if min_lon <= max_lon:
        return ok & (lon >= min_lon - margin) & (lon <= max_lon + margin)
    return ok & ((lon >= min_lon - margin) | (lon <= max_lon + margin))  # wraps across 180


def _apply_filters(df: pd.DataFrame, f: MetadataFilter, margin: float) -> pd.DataFrame:
    keep = np.ones(len(df), dtype=bool)
    if f.cells is not None:
        keep &= df["grid_cell"].isin(f.cells).to_numpy()
    if f.bbox is not None:
        keep &= _in_bbox(df, f.bbox, margin)
    ts = df["timestamp"]
    start, end = _utc(f.start), _utc(f.end)
    if start is not None:
        keep &= (ts.isna() | (ts >= start)).to_numpy()
    if end is not None:
        keep &= (ts.isna() | (ts <= end)).to_numpy()
    if f.max_cloud_cover is not None:
        cc = df["cloud_cover"].to_numpy()
        keep &= np.isnan(cc) | (cc <= f.max_cloud_cover)
    if f.max_nodata is not None:
        keep &= df["nodata"].to_numpy() <= f.max_nodata
    return df[keep]


def _deduplicate(m: Modality, df: pd.DataFrame) -> tuple[pd.DataFrame, DedupReport]:
    """Keep one row per grid cell by the module's documented rank; count what was dropped and why."""
    rows_in = len(df)
    dup = df["grid_cell"].duplicated(keep=False).to_numpy()
    if not dup.any():
        return df, DedupReport(m, rows_in, 0, 0)
    multi = df[dup].sort_values(
        ["grid_cell", "timestamp", "cloud_cover", "nodata", "product_id", "parquet_file", "parquet_row"],
        ascending=[True, False, True, True, True, True, True],
        na_position="last",
        kind="mergesort",
    )
    same_image = int(multi.duplicated(["grid_cell", "parquet_file", "parquet_row"]).sum())
    kept = multi.drop_duplicates("grid_cell", keep="first")
    out = pd.concat([df[~dup], kept])
    report = DedupReport(m, rows_in, same_image, len(multi) - len(kept) - same_image)
    if report.dropped:
        log.info(
            "%s: de-duplication dropped %d rows (%d same image, %d same cell)",
            m.dataset,
            report.dropped,
            report.same_image,
            report.same_cell,
        )
    return out, report


def cell_records(pairs: pd.DataFrame, modalities: Iterable[Modality]) -> list[CellRecord]:
    """Rows of a pairs frame -> :class:`CellRecord` (the only reader of its per-modality columns)."""
    mods = tuple(modalities)
    cols: dict[str, list] = {n: pairs[n].tolist() for n in ("grid_cell", "centre_lat", "centre_lon")}
    per = {m: [pairs[f"{m.name}_{f}"].tolist()
               for f in ("present", "file", "row", "product_id", "timestamp", "crs", "cloud_cover")]
           for m in mods}
    tiles = ([TileRef(int(e), str(t), int(px)) if pd.notna(px) else None for e, t, px in zip(
        pairs["tile_epsg"], pairs["tile_transform"], pairs["tile_px"], strict=True)]
        if "tile_px" in pairs else [None] * len(pairs))  # GeoTIFF tile folders (tiles_folder.py)
    out = []
    for i, cell in enumerate(cols["grid_cell"]):
        sources = tuple(
            SourceRef(m, str(cell), str(file[i]), int(row[i]), _text_or_none(pid[i]), _time_or_none(ts[i]),
                      _text_or_none(crs[i]), _float_or_none(cloud[i]))
            for m, (present, file, row, pid, ts, crs, cloud) in per.items() if bool(present[i]))
        out.append(CellRecord(str(cell), float(cols["centre_lat"][i]), float(cols["centre_lon"][i]), sources,
                              tiles[i]))
    return out


def _text_or_none(value: Any) -> str | None:
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _time_or_none(value: Any) -> datetime | None:
    return None if value is None or pd.isna(value) else pd.Timestamp(value).to_pydatetime()


_PER_MODALITY = ("product_id", "timestamp", "cloud_cover", "nodata", "crs", "parquet_file", "parquet_row")


def _pair_frames(frames: dict[Modality, pd.DataFrame], mods: tuple[Modality, ...]) -> pd.DataFrame:
    """Outer-join per-modality frames (one row per cell each) on an integer cell key, ordered by it.

    Column by column, and each modality's frame is dropped from ``frames`` once its columns are placed:
    the peak is the frames plus the pairs table, not several aligned copies of every frame (Major TOM
    Core: ~2.2 M rows per modality)."""
    # row * 10000 + col: unique per cell (|col| < 2004) and sorts like (grid_row_u, grid_col_r)
    keys = {m: pd.Index(frames[m]["grid_row_u"].to_numpy() * 10_000 + frames[m]["grid_col_r"].to_numpy(),
                        name="cell_key") for m in mods}
    index = pd.Index(np.unique(np.concatenate([k.to_numpy() for k in keys.values()] or [[]])))
    index = index.astype("int64")
    shared_names = ("grid_cell", "grid_row_u", "grid_col_r", "centre_lat", "centre_lon")
    shared: dict[str, pd.Series] = {}
    per: dict[Modality, dict[str, pd.Series]] = {}
    present: dict[Modality, np.ndarray] = {}
    # centre priority first (the first present modality gives a cell's id and centre), then the rest
    for m in [x for x in CENTRE_PRIORITY if x in mods] + [x for x in mods if x not in CENTRE_PRIORITY]:
        f = frames.pop(m)

        def aligned(name: str, f=f, m=m) -> pd.Series:
            return f[name].set_axis(keys[m]).reindex(index)

        for name in shared_names if m in CENTRE_PRIORITY else ():
            col = aligned(name)
            shared[name] = col if name not in shared else shared[name].where(shared[name].notna(), col)
        per[m] = {}
        for name in _PER_MODALITY:
            key = {"parquet_file": "file", "parquet_row": "row"}.get(name, name)
            col = aligned(name)
            per[m][key] = col.astype("Int64") if key == "row" else col
        present[m] = per[m]["file"].notna().to_numpy()
        del f
    out = pd.DataFrame(index=index)
    for name in shared_names:
        out[name] = shared.pop(name)
    out["grid_row_u"] = out["grid_row_u"].astype("int64")
    out["grid_col_r"] = out["grid_col_r"].astype("int64")
    mask = np.zeros(len(index), dtype=np.int64)
    for j, m in enumerate(mods):
        mask |= present[m].astype(np.int64) << j
    out["n_present"] = sum(present[m].astype(np.int64) for m in mods) if mods else 0
    out["n_present"] = out["n_present"].astype("int64")
    out["complete"] = out["n_present"].to_numpy() == len(mods)
    # an object array of the 2**n labels: rows share the label objects (not one new str per row)
    names = np.array(
        [",".join(m.name for j, m in enumerate(mods) if not (k >> j) & 1) for k in range(1 << len(mods))],
        dtype=object,
    )
    out["missing"] = names[mask]
    for m in mods:
        out[f"{m.name}_present"] = present[m]
        for key, col in per.pop(m).items():
            out[f"{m.name}_{key}"] = col
    s2_time = None
    for m in (Modality.S2L2A, Modality.S2L1C):  # S2L2A's time, else S2L1C's
        if m in mods:
            t = out[f"{m.name}_timestamp"]
            s2_time = t if s2_time is None else s2_time.where(s2_time.notna(), t)
    if Modality.S1RTC in mods and s2_time is not None:
        gap = (out[f"{Modality.S1RTC.name}_timestamp"] - s2_time).dt.total_seconds() / 3600.0
        out["s1_s2_gap_hours"] = gap.astype("float64")
    else:
        out["s1_s2_gap_hours"] = np.nan
    return out.reset_index(drop=True)
