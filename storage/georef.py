"""Where a cube sample lies on the map: its UTM CRS, the affine transform of its pixels, its footprint.

A sample is a ``sample_px`` square cut from a cell's thumbnail (``thumbnails.to_samples``). The thumbnail
of ``thumbnail_px`` pixels covers the cell's published raster footprint, 10 680 m a side in the sample's
UTM CRS (``grid.SampleFootprint``: the bottom-left grid point projected, padded by 340 m), so each
thumbnail pixel is ``10680 / thumbnail_px`` m (10 m at the published 1068 px; a DEM's 356 px thumbnail is
upsampled to 1068 first and lands on the same grid). The sample's window inside the thumbnail
(``thumbnails.sample_window``) then gives its transform; a window resized to ``sample_px`` scales it.

Everything is vectorised over samples (a cube grows by tens of thousands of samples at a time) and needs
no GIS library. The CRS is per sample because neighbouring cells can lie in different UTM zones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from copgen.errors import CopgenError
from copgen.modalities import Modality
from copgen.storage.majortom import grid
from copgen.storage.majortom.thumbnails import sample_window
from copgen.storage.majortom.utm import epsg_zone, utm_forward, utm_inverse

EXTENT_M = grid.CELL_M + 2 * grid.PADDING_M  # 10 680 m: the published raster's side
# the CRS preferred for a sample whose modalities come from products in different zones: the thumbnail
# pixels the model saw first (S2) define the grid
CRS_PRIORITY = (Modality.S2L2A, Modality.S2L1C, Modality.S1RTC, Modality.DEM)


class GeorefError(CopgenError, ValueError):
    """A sample whose position cannot be computed; the message names the cell and the field."""


@dataclass(frozen=True)
class Georef:
    """Georeferencing of n samples: ``epsg (n,)`` int32, ``transform (n, 6)`` GDAL-order float64
    ``(x_ul, res, 0, y_ul, 0, -res)``, ``corners (n, 4, 2)`` (lon, lat) upper-left, upper-right,
    lower-right, lower-left, and ``footprint (n,)`` the same ring as WKT ``POLYGON`` in lon/lat."""

    epsg: np.ndarray
    transform: np.ndarray
    corners: np.ndarray
    footprint: np.ndarray

    def bounds(self, i: int, size: int) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) in metres of sample ``i`` for a ``size`` px tile."""
        x, res, _, y, _, neg = self.transform[i]
        return float(x), float(y + neg * size), float(x + res * size), float(y)


def parse_epsg(crs: object, *, cell: str = "?", field: str = "crs") -> int:
    """``"EPSG:32633"``, ``"EPSG:EPSG:32633"`` or ``32633`` -> 32633 (a WGS84 UTM zone), else GeorefError."""
    try:
        zone, south = epsg_zone(crs if not isinstance(crs, float) else int(crs))
    except (ValueError, TypeError) as exc:
        raise GeorefError(f"cell {cell}: {field} {crs!r} is not a WGS84 UTM CRS ({exc})") from None
    return (32700 if south else 32600) + zone


def sample_epsg(rows, modalities: Sequence[Modality] = CRS_PRIORITY) -> np.ndarray:
    """Per sample: the CRS of its first present modality in ``CRS_PRIORITY`` order, else the grid's UTM
    zone of the cell. ``rows``: records (``CellRecord``, ``SamplePlan``: ``grid_cell`` and ``source(m)``)
    or a plan table (a DataFrame with ``grid_cell`` and optional ``M_crs`` columns)."""
    if hasattr(rows, "columns"):  # a plan table
        cells = [str(c) for c in rows["grid_cell"]]
        crs_of = {m: rows[f"{m.name}_crs"].tolist() for m in modalities if f"{m.name}_crs" in rows}
    else:
        cells = [r.grid_cell for r in rows]
        crs_of = {m: [None if (s := r.source(m)) is None else s.crs for r in rows] for m in modalities}
    out = np.zeros(len(cells), dtype=np.int32)
    todo = np.ones(len(cells), dtype=bool)
    for m, values in crs_of.items():
        for i, crs in enumerate(values):
            if todo[i] and isinstance(crs, str | int | np.integer) and str(crs).strip():
                out[i] = parse_epsg(crs, cell=cells[i], field=f"{m.name}_crs")
                todo[i] = False
    if todo.any():
        idx = np.flatnonzero(todo)
        out[idx] = np.asarray(grid.cell_utm_epsg(np.asarray([cells[i] for i in idx])), dtype=np.int32)
    return out


def sample_georef(
    cells: Sequence[str],
    patches: Sequence[str | int],
    epsg: Sequence[int] | np.ndarray | None = None,
    *,
    thumbnail_px: int = grid.RASTER_PX,
    sample_px: int = grid.PATCH_PX,
) -> Georef:
    """Georeferencing of samples ``(cells[i], patches[i])`` cut at ``sample_px`` from ``thumbnail_px``
    thumbnails, in ``epsg[i]`` (default: each cell's grid UTM zone)."""
    n = len(cells)
    cells_a = np.asarray([str(c) for c in cells])
    if len(patches) != n:
        raise GeorefError(f"{len(patches)} patches for {n} cells")
    try:
        lat0, lon0 = grid.cell_bottom_left(cells_a) if n else (np.zeros(0), np.zeros(0))
    except grid.GridError as exc:
        raise GeorefError(f"grid_cell: {exc}") from None
    lat0, lon0 = np.atleast_1d(lat0), np.atleast_1d(lon0)
    ep = (np.asarray(grid.utm_epsg_for(lat0, lon0), dtype=np.int32) if epsg is None
          else np.asarray(epsg, dtype=np.int32).reshape(n))
    # bottom-left grid point in each sample's CRS
    x0, y0 = np.empty(n), np.empty(n)
    for code in np.unique(ep):
        m = ep == code
        parse_epsg(int(code), cell=str(cells_a[m][0]), field="epsg")
        x0[m], y0[m] = utm_forward(lat0[m], lon0[m], int(code))
    pixel_m = EXTENT_M / float(thumbnail_px)
    col = np.empty(n)
    row = np.empty(n)
    side = np.empty(n)
    labels = [p if isinstance(p, int | np.integer) else (int(p) if str(p).isdigit() else str(p))
              for p in patches]
    for label in set(labels):
        c, r, s = sample_window(int(thumbnail_px), label, int(sample_px))
        m = np.asarray([x == label for x in labels], dtype=bool)
        col[m], row[m], side[m] = c, r, s
    x_ul = x0 - grid.PADDING_M + col * pixel_m
    y_ul = y0 + grid.CELL_M + grid.PADDING_M - row * pixel_m
    res = side * pixel_m / float(sample_px)
    zeros = np.zeros(n)
    transform = np.stack([x_ul, res, zeros, y_ul, zeros, -res], axis=-1)
    span = res * sample_px
    xs = np.stack([x_ul, x_ul + span, x_ul + span, x_ul], axis=-1)
    ys = np.stack([y_ul, y_ul, y_ul - span, y_ul - span], axis=-1)
    corners = np.empty((n, 4, 2))
    for code in np.unique(ep):
        m = ep == code
        lat, lon = utm_inverse(xs[m], ys[m], int(code))
        corners[m, :, 0], corners[m, :, 1] = lon, lat
    return Georef(ep, transform, corners, np.asarray([polygon_wkt(c) for c in corners], dtype=object))


def tile_georef(epsg: Sequence[int], transforms: Sequence[str | Sequence[float]], tile_px: Sequence[int],
                patches: Sequence[str | int], sample_px: int) -> Georef:
    """Georeferencing of samples cut from their own georeferenced tiles (GeoTIFF tile folders): the
    tile's GDAL transform (list or JSON) and side, then the window ``to_samples`` cuts from it."""
    n = len(patches)
    ep = np.asarray(epsg, dtype=np.int32).reshape(n)
    transform = np.empty((n, 6))
    for i, (t, px, p) in enumerate(zip(transforms, tile_px, patches, strict=True)):
        x, res, _, y, _, neg = (json.loads(t) if isinstance(t, str) else t)
        label = int(p) if str(p).isdigit() else str(p)
        col, row, side = sample_window(int(px), label, int(sample_px))
        scale = side / sample_px
        transform[i] = (x + col * res, res * scale, 0.0, y + row * neg, 0.0, neg * scale)
    span = transform[:, 1] * sample_px
    x_ul, y_ul = transform[:, 0], transform[:, 3]
    xs = np.stack([x_ul, x_ul + span, x_ul + span, x_ul], axis=-1)
    ys = np.stack([y_ul, y_ul, y_ul - span, y_ul - span], axis=-1)
    corners = np.empty((n, 4, 2))
    for code in np.unique(ep):
        m = ep == code
        lat, lon = utm_inverse(xs[m], ys[m], parse_epsg(int(code), field="tile_epsg"))
        corners[m, :, 0], corners[m, :, 1] = lon, lat
    return Georef(ep, transform, corners, np.asarray([polygon_wkt(c) for c in corners], dtype=object))


def polygon_wkt(corners: np.ndarray) -> str:
    """(4, 2) lon/lat corners -> closed WKT ``POLYGON ((lon lat, ...))`` (counter-clockwise is not
    required by WKT; the ring runs upper-left, upper-right, lower-right, lower-left, upper-left)."""
    ring = [*corners.tolist(), corners[0].tolist()]
    return "POLYGON ((" + ", ".join(f"{lon:.7f} {lat:.7f}" for lon, lat in ring) + "))"


def utm_wkt_name(epsg: int) -> str:
    """``"WGS 84 / UTM zone 33N"`` for 32633 (the EPSG name; the CRS itself is the EPSG code)."""
    zone, south = epsg_zone(epsg)
    return f"WGS 84 / UTM zone {zone}{'S' if south else 'N'}"
