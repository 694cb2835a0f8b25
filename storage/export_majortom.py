"""``copgen export --format majortom``: samples written as the published Major TOM Core layout.

One ``Core-<MOD>/metadata.parquet`` + ``images/part_NNNNN.parquet`` per modality (``MajorTomWriter``),
thumbnails encoded as published (S2 JPEG, S1 and DEM PNG; ``thumbnail_format="png"`` keeps generated S2
lossless) at the sample size. The published metadata columns come first; these follow:

``origin`` (real | generated), ``generator`` (JSON: run, seed, sampler, steps, conditioning modalities,
weights and their sha256; ``{}`` for real tiles), ``patch``, ``variant``, ``epsg``, ``transform`` (JSON
GDAL geotransform of the thumbnail), ``footprint`` (WKT lon/lat), ``product_time`` of the real sibling.

Published columns a generated tile has no value for: ``product_id`` = ``copgen:<run>:<sample id>``,
``timestamp`` = its real siblings' acquisition time (the scene it completes; else the epoch),
``cloud_cover`` = 0 (not measured), ``nodata`` = 0. A published reader reads one row per grid cell: export
one patch/variant per cell (the default ``--patches center`` runs) for it; copgen's reader keeps the
first row of a cell and reports the rest as duplicates.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from copgen.modalities import Modality
from copgen.storage.export import Sample, Tile, provenance_json
from copgen.storage.majortom.writer import CellRecord, MajorTomWriter

EXTRA_COLUMNS = (
    ("origin", pa.string()),
    ("generator", pa.string()),
    ("patch", pa.string()),
    ("variant", pa.int32()),
    ("epsg", pa.int32()),
    ("transform", pa.string()),
    ("footprint", pa.string()),
)
_EPOCH = pd.Timestamp("1970-01-01")


def _record(sample: Sample, tile: Tile) -> CellRecord:
    m, p = tile.modality, tile.provenance
    img = tile.image
    if m is Modality.DEM:  # the published DEM thumbnail is grey; a generated one has 3 near-equal channels
        img = np.round(img.astype(np.float32).mean(axis=-1)).astype(np.uint8)
    real = tile.origin == "real"
    when = p.get("product_time") if real else sample.product_time
    product_id = p.get("product_id") if real else f"copgen:{p.get('run_id', 'unknown')}:{sample.id}"
    cloud = p.get("cloud_cover") if real else None
    return CellRecord(
        grid_cell=sample.grid_cell,
        thumbnail=img,
        product_id=str(product_id or f"unknown:{sample.id}"),
        timestamp=pd.Timestamp(when) if when is not None and not pd.isna(when) else _EPOCH,
        cloud_cover=float(cloud) if cloud is not None and not pd.isna(cloud) else 0.0,
        crs=sample.epsg,
        centre_lat=sample.centre_lat,
        centre_lon=sample.centre_lon,
        extra={
            "origin": tile.origin,
            "generator": "{}" if real else provenance_json(tile),
            "patch": sample.patch,
            "variant": sample.variant,
            "epsg": sample.epsg,
            "transform": json.dumps(list(sample.transform)),
            "footprint": sample.footprint,
        },
    )


def write_majortom(
    samples: Iterable[Sample],
    out_url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    thumbnail_format: str | None = None,
    rows_per_part: int = 500,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``samples`` under ``out_url`` as ``Core-<MOD>`` datasets; returns counts per modality and
    origin. A modality no sample has gets no dataset."""
    writers: dict[Modality, MajorTomWriter] = {}
    counts: dict[str, dict[str, int]] = {}
    try:
        for s in samples:
            for m, tile in s.tiles.items():
                if m not in writers:
                    writers[m] = MajorTomWriter(out_url, m, rows_per_part=rows_per_part, include_bands=False,
                                                thumbnail_format=thumbnail_format, overwrite=overwrite,
                                                storage_options=storage_options, extra_columns=EXTRA_COLUMNS)
                writers[m].write(_record(s, tile))
                per = counts.setdefault(m.name, {})
                per[tile.origin] = per.get(tile.origin, 0) + 1
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    datasets = {m.name: w.close().metadata_url for m, w in writers.items()}
    return {"format": "majortom", "out": out_url, "tiles": counts, "datasets": datasets}
