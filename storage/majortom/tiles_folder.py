"""A folder of per-modality GeoTIFF tiles (TerraMesh-style) as a source for ``copgen complete``.

Layout: ``<root>/<MOD>/<tile>.tif`` with ``MOD`` one of DEM, S1RTC, S2L1C, S2L2A (case-insensitive;
TerraMesh also writes ``S1GRD``/``S2RGB``-style names, which are not modalities here and are ignored).
A tile id is the file stem; tiles with one id in several modality folders are one sample. TerraMesh stems
``<cell>_<a>_<b>`` start with their Major TOM cell. Each tile becomes its modality's published thumbnail
(``storage/images.py``: the bands through the published recipe, or RGB/grey uint8 as they are), and its
own CRS and transform georeference the cube samples cut from it (plan columns ``tile_epsg``,
``tile_transform``, ``tile_px``; ``flows/plan.py``), since a tile is not a whole Major TOM footprint.

The reader offers what the completion flow uses of ``MajorTomReader``: ``pair``, ``refs``,
``read_samples``, ``fetch_thumbnails``; filters other than ``cells`` are refused (there is no metadata
to filter on). Tiles of one id must share size and grid; a tile that cannot be read is a bad sample.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from copgen.modalities import ALL, Modality
from copgen.records import CellRecord
from copgen.storage.fsutil import join_url
from copgen.storage.images import GEOTIFF_SUFFIXES, ImageInputError, read_image
from copgen.storage.majortom.reader import (
    BadSample,
    FetchResult,
    MetadataFilter,
    PairsTable,
    Sample,
    SampleRef,
    cell_records,
)
from copgen.storage.majortom.utm import utm_inverse


def modality_folders(root: str, storage_options: Mapping[str, Any] | None = None) -> dict[Modality, str]:
    """``{modality: folder URL}`` of the modality folders under ``root`` holding GeoTIFFs."""
    fs, path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
    if not fs.isdir(path):
        return {}
    names = {m.name.lower(): m for m in ALL}
    out = {}
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = names.get(name.lower())
        if m is not None and any(p.lower().endswith(GEOTIFF_SUFFIXES) for p in fs.ls(entry, detail=False)):
            out[m] = join_url(root, name)
    return out


def is_tiles_folder(root: str | None, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True for a folder of modality folders with GeoTIFFs and no ``Core-*`` datasets."""
    if not root:
        return False
    fs, path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
    if not fs.isdir(path) or any(p.rstrip("/").rsplit("/", 1)[-1].startswith("Core-") for p in fs.ls(path)):
        return False
    return bool(modality_folders(root, storage_options))


@dataclass
class TilePairing(PairsTable):
    pairs: pd.DataFrame
    bad: list[BadSample] = field(default_factory=list)
    duplicates_dropped: dict[Modality, int] = field(default_factory=dict)

    def cells(self, pairs: pd.DataFrame | None = None) -> list[CellRecord]:
        """The typed records of ``pairs`` (default: every tile), as ``Pairing.cells`` (copgen.records)."""
        return cell_records(self.pairs if pairs is None else pairs, ALL)


class TileFolderReader:
    """See the module docstring."""

    def __init__(self, root: str, *, storage_options: Mapping[str, Any] | None = None,
                 on_error: str = "skip", **_: Any) -> None:
        self.root = root
        self.storage_options = dict(storage_options or {})
        self.on_error = on_error
        self.folders = modality_folders(root, self.storage_options)

    def __enter__(self) -> TileFolderReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        return None

    def _files(self, m: Modality) -> dict[str, str]:
        fs, path = fsspec.core.url_to_fs(self.folders[m], **self.storage_options)
        files = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(GEOTIFF_SUFFIXES))
        return {p.rsplit("/", 1)[-1].rsplit(".", 1)[0]: join_url(self.folders[m], p.rsplit("/", 1)[-1])
                for p in files}

    def pair(self, filters: MetadataFilter | None = None, **_: Any) -> TilePairing:
        if filters is not None and any(getattr(filters, f) is not None for f in
                                       ("bbox", "start", "end", "max_cloud_cover", "max_nodata")):
            raise ValueError(f"{self.root}: a GeoTIFF tile folder has no metadata to filter on; only cells "
                             "(tile ids) can be selected")
        files = {m: self._files(m) for m in self.folders}
        ids = sorted(set().union(*[set(f) for f in files.values()])) if files else []
        if filters is not None and filters.cells is not None:
            ids = [i for i in ids if i in filters.cells]
        rows, bad = [], []
        for tile in ids:
            row: dict[str, Any] = {"grid_cell": tile}
            geo = None
            for m in ALL:
                url = files.get(m, {}).get(tile)
                row[f"{m.name}_present"] = url is not None
                row[f"{m.name}_file"] = url
                row[f"{m.name}_row"] = 0 if url else -1
                row[f"{m.name}_product_id"] = tile if url else None
                row[f"{m.name}_timestamp"] = pd.NaT
                row[f"{m.name}_crs"] = None
                row[f"{m.name}_cloud_cover"] = np.nan
                if url is None:
                    continue
                try:
                    info = _tile_info(url, self.storage_options)
                except ImageInputError as exc:
                    bad.append(BadSample(m.dataset, tile, url, 0, "tile", str(exc)))
                    row[f"{m.name}_present"] = False
                    continue
                row[f"{m.name}_crs"] = f"EPSG:{info[0]}" if info[0] else None
                if geo is None:
                    geo = info
                elif info != geo:
                    bad.append(BadSample(m.dataset, tile, url, 0, "transform",
                                         f"not on the grid of the tile's other modalities: {info} != {geo}"))
                    row[f"{m.name}_present"] = False
            if geo is None:
                continue
            epsg, transform, px = geo
            x, res, _, y, _, neg = transform
            lat, lon = utm_inverse(x + res * px / 2, y + neg * px / 2, epsg) if epsg else (np.nan, np.nan)
            row.update({"centre_lat": float(lat), "centre_lon": float(lon), "tile_epsg": epsg,
                        "tile_transform": json.dumps(list(transform)), "tile_px": px})
            present = [m.name for m in ALL if row[f"{m.name}_present"]]
            row.update({"n_present": len(present), "complete": len(present) == len(ALL),
                        "missing": ",".join(m.name for m in ALL if m.name not in present)})
            rows.append(row)
        return TilePairing(pd.DataFrame(rows), bad)

    def refs(self, rows: pd.DataFrame, modality: Modality | str) -> list[SampleRef]:
        m = Modality.parse(modality)
        present = rows[rows[f"{m.name}_present"]]
        return [SampleRef(m, str(c), str(f), 0) for c, f in zip(present.grid_cell, present[f"{m.name}_file"],
                                                                  strict=True)]

    def read_samples(self, refs: Sequence[SampleRef], *, thumbnail: bool = True, on_error: str | None = None,
                     **_: Any) -> FetchResult:
        samples, bad = [], []
        for ref in refs:
            try:
                img = read_image(ref.file, ref.modality, self.storage_options)
            except (ImageInputError, ValueError, OSError) as exc:
                if (on_error or self.on_error) == "raise":
                    raise
                bad.append(BadSample(ref.modality.dataset, ref.grid_cell, ref.file, 0, "tile", str(exc)))
                continue
            samples.append(Sample(ref, img.pixels))
        return FetchResult(samples, bad)

    def fetch_thumbnails(self, rows, modality, *, on_error: str | None = None) -> FetchResult:
        refs = self.refs(rows, modality) if isinstance(rows, pd.DataFrame) else list(rows)
        return self.read_samples(refs, on_error=on_error)


def _tile_info(url: str, storage_options: Mapping[str, Any]) -> tuple[int | None, tuple[float, ...], int]:
    """(EPSG, GDAL transform, side px) of a square GeoTIFF tile."""
    from rasterio.errors import RasterioIOError
    from rasterio.io import MemoryFile

    with fsspec.open(url, "rb", **dict(storage_options)) as f:
        data = f.read()
    try:
        with MemoryFile(data) as mem, mem.open() as ds:
            if ds.crs is None or ds.width != ds.height:
                raise ImageInputError(f"{url}: need a square tile with a CRS, got {ds.width}x{ds.height}, "
                                      f"crs {ds.crs}")
            return ds.crs.to_epsg(), tuple(float(v) for v in ds.transform.to_gdal()), int(ds.width)
    except RasterioIOError as exc:
        raise ImageInputError(f"{url}: not a readable GeoTIFF ({exc})") from None
