"""The published Major TOM Core layout: folder and file names, column names and types per modality.

Sources (see docs/research/majortom.md §2): the Hugging Face dataset cards (image parquet columns), the
official notebooks and COP-GEN-Beta's downloader (metadata columns). One dataset per modality::

    <root>/Core-<MOD>/metadata.parquet            one row per sample, index into images/
    <root>/Core-<MOD>/images/part_00001.parquet   one sample per row group; 5 digits, 1-based

``metadata.parquet``'s ``parquet_row`` is the row-group index inside ``parquet_url``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
from copgen.modalities import Modality

METADATA_FILE = "metadata.parquet"
IMAGES_DIR = "images"
PART_NAME = "part_{index:05d}.parquet"
PART_PATTERN = re.compile(r"(?:^|/)images/(part_\d{5}\.parquet)$")
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%S"  # e.g. 20230119T161811, as stored in metadata and product_datetime
HF_URL_PREFIX = "https://huggingface.co/datasets/Major-TOM/{dataset}/resolve/main"

S2L2A_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S2L1C_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")


@dataclass(frozen=True)
class ModalityLayout:
    """What one Core dataset stores: image columns (in file order), metadata schema, thumbnail geometry."""

    modality: Modality
    image_key_columns: tuple[str, ...]  # string columns before the thumbnail (product_id, grid_cell, ...)
    bands: tuple[str, ...]  # single-band GeoTIFF columns
    extra_binary: tuple[str, ...]  # other binary columns (cloud_mask, DEM's 'compressed')
    band_pixels: dict[str, int]  # side length of each band raster (10.68 km footprint)
    band_dtype: dict[str, str]
    metadata_schema: pa.Schema
    thumbnail_size: int  # published thumbnail side in px
    thumbnail_channels: int  # 3 = RGB, 1 = grey
    default_thumbnail_format: str  # what the published bytes are (sniffed on read anyway)
    binary_order: tuple[str, ...] | None = None  # file order after thumbnail when not bands + extra_binary

    @property
    def dataset(self) -> str:
        return self.modality.dataset

    @property
    def has_timestamp(self) -> bool:
        return "timestamp" in self.metadata_schema.names

    @property
    def binary_columns(self) -> tuple[str, ...]:
        """Every binary column in published file order, thumbnail first."""
        return ("thumbnail", *(self.binary_order or (*self.bands, *self.extra_binary)))

    def image_schema(self, include_bands: bool = True) -> pa.Schema:
        """Image parquet schema in published column order; ``include_bands=False``: thumbnail only."""
        fields = [pa.field(name, pa.string()) for name in self.image_key_columns]
        binary = self.binary_columns if include_bands else ("thumbnail",)
        return pa.schema(fields + [pa.field(name, pa.binary()) for name in binary])


def _metadata_schema(*middle: tuple[str, pa.DataType], tail: tuple[tuple[str, pa.DataType], ...] = ()):
    head = [("grid_cell", pa.string()), ("grid_row_u", pa.int64()), ("grid_col_r", pa.int64())]
    common_tail = [
        ("centre_lat", pa.float64()),
        ("centre_lon", pa.float64()),
        ("crs", pa.string()),
        ("parquet_url", pa.string()),
        ("parquet_row", pa.int64()),
    ]
    return pa.schema([*head, *middle, *common_tail, *tail])


def _s2(modality: Modality, bands: tuple[str, ...]) -> ModalityLayout:
    pixels = {b: 1068 for b in bands}
    pixels.update({b: 534 for b in ("B05", "B06", "B07", "B8A", "B11", "B12")})
    pixels.update({b: 178 for b in ("B01", "B09", "B10") if b in bands})
    pixels["cloud_mask"] = 1068
    dtypes = {b: "uint16" for b in bands}
    dtypes["cloud_mask"] = "uint8"
    return ModalityLayout(
        modality=modality,
        image_key_columns=("product_id", "grid_cell", "product_datetime"),
        bands=bands,
        extra_binary=("cloud_mask",),
        band_pixels=pixels,
        band_dtype=dtypes,
        metadata_schema=_metadata_schema(
            ("product_id", pa.string()),
            ("timestamp", pa.string()),
            ("cloud_cover", pa.float64()),
            ("nodata", pa.float64()),
        ),
        thumbnail_size=1068,
        thumbnail_channels=3,
        default_thumbnail_format="jpeg",  # the official notebooks open them as JpegImageFile
    )


LAYOUTS: dict[Modality, ModalityLayout] = {
    Modality.S2L2A: _s2(Modality.S2L2A, S2L2A_BANDS),
    Modality.S2L1C: _s2(Modality.S2L1C, S2L1C_BANDS),
    Modality.S1RTC: ModalityLayout(
        modality=Modality.S1RTC,
        image_key_columns=("product_id", "grid_cell", "product_datetime"),
        bands=("vv", "vh"),
        extra_binary=(),
        band_pixels={"vv": 1068, "vh": 1068},
        band_dtype={"vv": "float32", "vh": "float32"},
        metadata_schema=_metadata_schema(
            ("product_id", pa.string()),
            ("timestamp", pa.string()),
            ("nodata", pa.float64()),
            ("orbit_state", pa.string()),
        ),
        thumbnail_size=1068,
        thumbnail_channels=3,
        default_thumbnail_format="png",
    ),
    Modality.DEM: ModalityLayout(
        modality=Modality.DEM,
        image_key_columns=("grid_cell",),
        bands=("DEM",),
        extra_binary=("compressed",),
        band_pixels={"DEM": 356, "compressed": 356},
        band_dtype={"DEM": "float32"},
        metadata_schema=_metadata_schema(
            ("nodata", pa.float64()),
            ("max_val", pa.float64()),
            ("min_val", pa.float64()),
            tail=(("__index_level_0__", pa.int64()),),  # a pandas index artefact in the published file
        ),
        thumbnail_size=356,
        thumbnail_channels=1,
        default_thumbnail_format="png",
        binary_order=("compressed", "DEM"),  # published order: grid_cell, thumbnail, compressed, DEM
    ),
}


def layout(modality: Modality | str | int) -> ModalityLayout:
    """The published layout of one modality's Core dataset."""
    return LAYOUTS[Modality.parse(modality)]


def part_name(index: int) -> str:
    """``part_00001.parquet`` for index 1 (parts are 1-based, as published)."""
    if index < 1 or index > 99_999:
        raise ValueError(f"part index {index} outside 1..99999")
    return PART_NAME.format(index=index)
