"""``copgen export --format cog``: one Cloud-Optimized GeoTIFF per tile and a STAC catalog over them.

Layout (any fsspec URL)::

    <out>/catalog.json
    <out>/<collection>/collection.json           one collection per generating run ("real": samples
    <out>/<collection>/<item>/<item>.json         with no generated tile); one item per sample
    <out>/<collection>/<item>/<MOD>.tif           one asset per modality

GeoTIFFs: the sample's UTM CRS and transform (``storage/georef.py``), deflate, internal 256 px tiles
(GDAL's COG driver); RGB modalities 3 bands, DEM 1 (grey hillshade). Items carry ``proj:code``,
``proj:shape``, ``proj:transform``, ``proj:bbox`` (projection v2.0.0), ``processing:lineage`` and
``processing:software`` (processing v1.2.0), the licence, and per asset ``copgen:origin`` (real |
generated) plus the generator's provenance (``copgen:seed``, ``copgen:run_id``, ``copgen:network_sha256``
...). ``validate_catalog`` checks every JSON file against the STAC schemas with no network access:
pystac ships the core v1.1.0 and GeoJSON schemas, the two extension schemas are vendored in
``copgen.storage.stac_schemas`` (source and version in its README).
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pystac
from copgen import package_version
from copgen.errors import CopgenError
from copgen.modalities import Modality
from copgen.storage.cubes import LICENCE, LICENCE_NOTE
from copgen.storage.export import Sample, Tile
from copgen.storage.fsutil import check_id, join_url
from copgen.storage.objects import redact
from pystac.extensions.projection import ProjectionExtension
from pystac.validation.stac_validator import JsonSchemaSTACValidator

PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
VENDORED = {
    ProjectionExtension.get_schema_uri(): "projection-v2.0.0.json",
    PROCESSING_SCHEMA: "processing-v1.2.0.json",
}
COG_MEDIA_TYPE = pystac.MediaType.COG


class StacExportError(CopgenError, ValueError):
    """A COG/STAC export that cannot be written or does not validate."""


# ---- offline validation ---------------------------------------------------------------------------


class OfflineValidator(JsonSchemaSTACValidator):
    """pystac's JSON-schema validator that never fetches: core schemas from pystac, extensions from the
    vendored files; any other schema is an error naming it."""

    def __init__(self) -> None:
        super().__init__()
        pkg = importlib.resources.files("copgen.storage.stac_schemas")
        for uri, name in VENDORED.items():
            schema = json.loads(pkg.joinpath(name).read_text())
            self.schema_cache[uri] = schema
            self.schema_cache[uri + "#"] = schema

    def _get_schema(self, schema_uri: str) -> dict[str, Any]:
        if schema_uri not in self.schema_cache:
            raise StacExportError(f"schema {schema_uri} is not available offline (not vendored)")
        return self.schema_cache[schema_uri]


def validate_catalog(out_url: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Validate every STAC JSON file under ``out_url`` offline; returns how many. Raises
    ``pystac.errors.STACValidationError`` naming the file on the first invalid one."""
    fs, root = fsspec.core.url_to_fs(out_url, **dict(storage_options or {}))
    validator = OfflineValidator()
    paths = sorted(p for p in fs.find(root) if p.endswith(".json"))
    for path in paths:
        d = json.loads(fs.cat_file(path))
        pystac.validation.validate_dict(d, href=path, validator=validator)
    return len(paths)


# ---- I/O through fsspec ---------------------------------------------------------------------------


class FsspecStacIO(pystac.StacIO):
    """pystac reads and writes through fsspec (local paths, s3://, ...)."""

    def __init__(self, storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.storage_options = dict(storage_options or {})

    def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
        href = source.get_absolute_href() if isinstance(source, pystac.Link) else str(source)
        with fsspec.open(href, "r", **self.storage_options) as f:
            return f.read()

    def write_text(self, dest: Any, txt: str, *args: Any, **kwargs: Any) -> None:
        href = dest.get_absolute_href() if isinstance(dest, pystac.Link) else str(dest)
        fs, path = fsspec.core.url_to_fs(href, **self.storage_options)
        if "://" not in href:
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, txt.encode())


# ---- GeoTIFF ---------------------------------------------------------------------------------------


def cog_bytes(image: np.ndarray, modality: Modality, epsg: int, transform: tuple[float, ...],
              tags: Mapping[str, str] | None = None) -> bytes:
    """One tile as Cloud-Optimized GeoTIFF bytes (GDAL's COG driver, deflate)."""
    from rasterio.io import MemoryFile
    from rasterio.transform import Affine

    img = np.asarray(image)
    if modality is Modality.DEM:
        bands = np.round(img.astype(np.float32).mean(axis=-1))[None].astype(np.uint8)
    else:
        bands = np.moveaxis(img, -1, 0)
    count, h, w = bands.shape
    with MemoryFile() as mem:
        with mem.open(driver="COG", width=w, height=h, count=count, dtype="uint8", crs=f"EPSG:{int(epsg)}",
                      transform=Affine.from_gdal(*transform), compress="deflate",
                      blocksize=min(256, max(16, 16 * (w // 16)))) as dst:
            dst.write(bands)
            dst.update_tags(**dict(tags or {}))
            names = ("hillshade",) if count == 1 else ("red", "green", "blue")
            for i, name in enumerate(names, 1):
                dst.set_band_description(i, name)
        return mem.read()


# ---- STAC --------------------------------------------------------------------------------------------


def _collection_id(sample: Sample) -> str:
    return check_id(sample.run_id, "run id") if sample.run_id else "real"


def _item(sample: Sample, exported_at: datetime) -> pystac.Item:
    lon, lat = sample.corners[:, 0], sample.corners[:, 1]
    ring = [[float(x), float(y)] for x, y in sample.corners] + [[float(lon[0]), float(lat[0])]]
    when = sample.product_time
    dt = exported_at if when is None or pd.isna(when) else pd.Timestamp(when).tz_localize(
        UTC if pd.Timestamp(when).tzinfo is None else None).to_pydatetime()
    generated = [t for t in sample.tiles.values() if t.origin == "generated"]
    props: dict[str, Any] = {
        "license": LICENCE,
        "copgen:grid_cell": sample.grid_cell,
        "copgen:patch": sample.patch,
        "copgen:variant": sample.variant,
        "copgen:synthetic": bool(generated),
        "processing:lineage": (
            "COP-GEN-Beta generation of " + ", ".join(t.modality.name for t in generated)
            + " conditioned on the real modalities of the sample (copgen complete)" if generated
            else "Major TOM Core thumbnails cut into model samples (copgen)"),
        "processing:software": {"copgen": package_version()},
    }
    if when is None:
        props["copgen:datetime_is_export_time"] = True
    item = pystac.Item(
        id=check_id(sample.id, "item id"),
        geometry={"type": "Polygon", "coordinates": [ring]},
        bbox=[float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max())],
        datetime=dt,
        properties=props,
    )
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    from rasterio.transform import Affine

    proj.code = f"EPSG:{sample.epsg}"
    proj.shape = [sample.size, sample.size]
    proj.transform = list(Affine.from_gdal(*sample.transform))[:6]
    proj.bbox = list(sample.bounds())
    item.stac_extensions.append(PROCESSING_SCHEMA)
    return item


def _asset_fields(tile: Tile) -> dict[str, Any]:
    out: dict[str, Any] = {"copgen:origin": tile.origin}
    for k, v in tile.provenance.items():
        out[f"copgen:{k}"] = v.isoformat() if isinstance(v, pd.Timestamp) else v
    return json.loads(json.dumps(out, default=str))


def write_cog_stac(
    samples: Iterable[Sample],
    out_url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    title: str = "copgen corpus",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the COGs and the STAC catalog (self-contained, relative links); returns counts."""
    so = dict(storage_options or {})
    fs, root = fsspec.core.url_to_fs(out_url, **so)
    if not overwrite and fs.exists(root) and (not fs.isdir(root) or fs.ls(root)):
        # never write into a store we did not make (a previous corpus or anything else)
        raise StacExportError(f"{redact(out_url)} exists and is not empty; choose a new --out")
    exported_at = datetime.now(UTC).replace(microsecond=0)
    catalog = pystac.Catalog(id="copgen-corpus", title=title,
                             description=f"copgen export: Cloud-Optimized GeoTIFFs per tile. {LICENCE_NOTE}")
    collections: dict[str, pystac.Collection] = {}
    boxes: dict[str, list[list[float]]] = {}
    times: dict[str, list[datetime]] = {}
    counts: dict[str, dict[str, int]] = {}
    for s in samples:
        cid = _collection_id(s)
        if cid not in collections:
            collections[cid] = _collection(cid, exported_at)
            catalog.add_child(collections[cid])
        item = _item(s, exported_at)
        base = join_url(out_url, cid, item.id)
        for m, tile in s.tiles.items():
            tags = {"copgen_origin": tile.origin, "grid_cell": s.grid_cell, "patch": s.patch,
                    "license": LICENCE}
            data = cog_bytes(tile.image, m, s.epsg, s.transform, tags)
            href = join_url(base, f"{m.name}.tif")
            _write_bytes(href, data, so)
            item.add_asset(m.name, pystac.Asset(href=href, media_type=COG_MEDIA_TYPE, roles=["data"],
                                                title=f"{m.name} ({tile.origin})",
                                                extra_fields=_asset_fields(tile)))
            per = counts.setdefault(m.name, {})
            per[tile.origin] = per.get(tile.origin, 0) + 1
        collections[cid].add_item(item)
        boxes.setdefault(cid, []).append(item.bbox)
        times.setdefault(cid, []).append(item.datetime)
    for cid, col in collections.items():
        col.extent = _extent(boxes[cid], times[cid])
    stac_io = FsspecStacIO(so)
    catalog.normalize_hrefs(out_url)
    catalog.make_all_asset_hrefs_relative()
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED, stac_io=stac_io)
    return {"format": "cog", "out": out_url, "tiles": counts, "collections": sorted(collections),
            "items": sum(len(v) for v in boxes.values())}


def _collection(cid: str, exported_at: datetime) -> pystac.Collection:
    """The collection of one run's samples (``real``: samples with nothing generated); its extent is set
    once its items are known."""
    return pystac.Collection(
        id=cid,
        description=(f"Samples completed by run {cid} (COP-GEN-Beta); real tiles are Major TOM Core"
                     if cid != "real" else "Real Major TOM Core samples (nothing generated)"),
        extent=pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]),
                             pystac.TemporalExtent([[exported_at, exported_at]])),
        license=LICENCE,
        providers=[pystac.Provider("ESA Φ-lab (Major TOM Core)", roles=["licensor", "producer"]),
                   pystac.Provider("copgen", roles=["processor"])],
    )


def _extent(boxes: list[list[float]], times: list[datetime]) -> pystac.Extent:
    """The extent that covers the items' bounding boxes and times."""
    b = np.asarray(boxes)
    return pystac.Extent(
        pystac.SpatialExtent([[float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()),
                               float(b[:, 3].max())]]),
        pystac.TemporalExtent([[min(times), max(times)]]))


def _write_bytes(href: str, data: bytes, storage_options: Mapping[str, Any]) -> None:
    fs, path = fsspec.core.url_to_fs(href, **storage_options)
    if "://" not in href:  # object stores have no directories; local disk does
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)
