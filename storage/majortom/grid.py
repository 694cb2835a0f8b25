"""The Major TOM 10 km grid (bit-compatible with the official ``Grid(10)``), vectorised with numpy.

Cells are named ``"<row>_<col>"``: row ``r >= 0`` -> ``"{r}U"``, ``r < 0`` -> ``"{-r}D"``; column
``c >= 0`` -> ``"{c}R"``, ``c < 0`` -> ``"{-c}L"`` (``454U_120R``). ``(r, c)`` are the signed ints of the
published ``grid_row_u`` / ``grid_col_r`` columns. A cell's grid point is its BOTTOM-LEFT corner and a
cell owns the half-open band ``(line, next line]`` on both axes.

Why the arrays are rebuilt exactly like the official code (linspace -> mod -> sort) instead of the closed
form ``ceil(lat/dlat) - 1``: float rounding in that construction moves the -180 deg column to +180.0 in 12
rows (+-502, +-518, +-521, +-581, +-794, +-800) and shifts points lying exactly on lines. Published cell ids
follow the official floats, so only the same floats reproduce them everywhere.

Deliberate deviation: latitudes outside the grid are rejected (:class:`GridError`) instead of copying the
official searchsorted wrap, which sends every point south of -84.97006 deg to the northern row ``946U``.

The sample footprint (research note majortom.md §1.3): with ``(x0, y0)`` the cell's bottom-left grid point
projected into the sample's UTM CRS, the published 1068 px raster (10 m) covers
``[x0-340, x0+10340] x [y0-340, y0+10340]`` m and the metadata ``centre_lat/centre_lon`` is the inverse
projection of ``(x0+5000, y0+5000)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from copgen.errors import CopgenError
from copgen.storage.majortom.utm import epsg_zone, utm_forward, utm_inverse

__all__ = [
    "GridError",
    "DIST_KM",
    "LAT_LIMIT",
    "RASTER_PX",
    "PIXEL_M",
    "PADDING_M",
    "CELL_M",
    "CROP_PX",
    "PATCH_PX",
    "PATCH_GRID",
    "N_PATCHES",
    "latlon_to_rowcol",
    "latlon_to_cell",
    "format_cell",
    "parse_cell",
    "cell_bottom_left",
    "cell_bounds",
    "cell_utm_epsg",
    "utm_epsg_for",
    "cell_centre",
    "n_columns",
    "row_range",
    "column_range",
    "patch_window",
    "SampleFootprint",
    "sample_footprint",
]

RADIUS_EQUATOR_KM = 6378.137  # the official grid uses a sphere of the equatorial radius
DIST_KM = 10  # Major TOM Core grid spacing
LAT_LIMIT = 85.0  # the official default latitude_range is (-85, 85)

# The published raster and the release's sample layout (COP-GEN-Beta prepare_dataset_images.py)
CELL_M = 10_000.0  # nominal cell side in metres
PADDING_M = 340.0  # padding on each side of the cell in the published rasters
PIXEL_M = 10.0  # 10 m pixels (S2 10 m bands, S1, thumbnails)
RASTER_PX = 1068  # (10000 + 2*340) / 10
CROP_PX = 1024  # torchvision CenterCrop(1024) of the 1068 thumbnail
PATCH_PX = 256  # model input side
PATCH_GRID = 4  # 4x4 patches, row-major, index 0..15
N_PATCHES = PATCH_GRID * PATCH_GRID


class GridError(CopgenError, ValueError):
    """A malformed or non-existent cell id, or a point the grid does not cover."""


@dataclass(frozen=True)
class _Tables:
    """The official grid arrays, built once. Row index i <-> row_u = i + row_u0."""

    lats: np.ndarray  # (R,) row latitudes (bottom edges), sorted south -> north
    row_u0: int  # signed row number of lats[0] (-946)
    counts: np.ndarray  # (R,) columns per row
    offsets: np.ndarray  # (R+1,) start of each row in lons
    zero_idx: np.ndarray  # (R,) index inside the row of the column starting at exactly 0.0 (col 0R)
    lons: np.ndarray  # (sum(counts),) all rows' sorted column longitudes (left edges), concatenated


@lru_cache(maxsize=1)
def _tables() -> _Tables:
    # Rows: the exact official construction (numpy float64, same calls in the same order).
    n_lat = math.ceil(math.pi * RADIUS_EQUATOR_KM / DIST_KM)
    lats_all = np.sort(np.mod(np.linspace(-90, 90, n_lat + 1)[:-1], 180) - 90)
    zeroth = int(np.searchsorted(lats_all, 0))
    keep = np.flatnonzero((lats_all >= -LAT_LIMIT) & (lats_all <= LAT_LIMIT))
    lats = lats_all[keep]
    row_u0 = int(keep[0]) - zeroth
    counts = np.empty(len(lats), dtype=np.int64)
    zero_idx = np.empty(len(lats), dtype=np.int64)
    rows = []
    for i, lat in enumerate(lats.tolist()):
        # scalar math.cos exactly as the official code: numpy's SIMD cos may differ in the last ulp,
        # which could flip a ceil() and change a row's column count
        circumference = 2 * math.pi * (RADIUS_EQUATOR_KM * math.cos(lat * math.pi / 180))
        n = math.ceil(circumference / DIST_KM)
        lons = np.sort(np.mod(np.linspace(-180, 180, n + 1)[:-1], 360) - 180)
        counts[i] = n
        zero_idx[i] = int(np.flatnonzero(lons == 0)[0])
        rows.append(lons)
    offsets = np.zeros(len(lats) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat = np.concatenate(rows)
    for arr in (lats, counts, offsets, zero_idx, flat):
        arr.flags.writeable = False
    return _Tables(lats, row_u0, counts, offsets, zero_idx, flat)


# --------------------------------------------------------------------------------------------- naming


def _name(value: int, pos: str, neg: str) -> str:
    return f"{abs(value)}{pos if value >= 0 else neg}"


@lru_cache(maxsize=1)
def _name_tables() -> tuple[np.ndarray, np.ndarray, int]:
    """Row names with the '_' (index row_u - row_u0) and column names (index col_r + c_max)."""
    t = _tables()
    rows = np.array([_name(t.row_u0 + i, "U", "D") + "_" for i in range(len(t.lats))])
    c_max = int(t.counts.max())
    cols = np.array([_name(c, "R", "L") for c in range(-c_max, c_max + 1)])
    return rows, cols, c_max


def format_cell(row_u, col_r):
    """Signed (row_u, col_r) -> ``"454U_120R"`` (scalars -> str, arrays -> numpy str array).

    Only the name is built (no check that the cell exists); rows must lie in -946..946.
    """
    r = np.asarray(row_u, dtype=np.int64)
    c = np.asarray(col_r, dtype=np.int64)
    if r.ndim == 0 and c.ndim == 0:
        return _name(int(r), "U", "D") + "_" + _name(int(c), "R", "L")
    rows, cols, c_max = _name_tables()
    ri = _row_index(r, row_u)
    if np.any(np.abs(c) > c_max):
        raise GridError(f"column number beyond the grid's widest row ({c_max} columns each side)")
    return np.strings.add(rows[ri], cols[c + c_max])


# A cell id, e.g. ``454U_120R``: the one definition, also run vectorised by the reader (Arrow regex).
# At most 4 digits: the grid has 946 rows and at most 1517 columns each side.
CELL_PATTERN = r"(?P<r>0|[1-9]\d{0,3})(?P<ns>[UD])_(?P<c>0|[1-9]\d{0,3})(?P<ew>[LR])"
_CELL_RE = re.compile(CELL_PATTERN)


def _parse_one(cell: object) -> tuple[int, int]:
    if not isinstance(cell, str | np.str_):
        raise GridError(f"cell id must be a string like '454U_120R', got {type(cell).__name__} {cell!r}")
    m = _CELL_RE.fullmatch(cell)
    if m is None:
        raise GridError(f"malformed cell id {cell!r}: expected '<n>U|D_<m>L|R' like '454U_120R'")
    r = int(m.group(1)) * (1 if m.group(2) == "U" else -1)
    c = int(m.group(3)) * (1 if m.group(4) == "R" else -1)
    if (m.group(2) == "D" and r == 0) or (m.group(4) == "L" and c == 0):
        raise GridError(f"cell {cell!r} does not exist: there is no row '0D' / column '0L'")
    return r, c


def _parse_many(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised parse of a str array (digits read from the UCS-4 code points: ``astype(int)`` on strings
    is ~10x slower). Validation is exact: each id must equal the canonical name of what it parsed to."""
    s = np.ascontiguousarray(arr.astype(str))
    width = s.dtype.itemsize // 4
    rows = cols = None
    if s.size and width >= 4:
        cp = s.reshape(-1).view(np.uint32).reshape(-1, width).astype(np.int64)
        is_us = cp == ord("_")
        us = np.argmax(is_us, axis=1)
        length = np.count_nonzero(cp, axis=1)
        rows = np.zeros(len(cp), dtype=np.int64)
        cols = np.zeros(len(cp), dtype=np.int64)
        for j in range(min(width, 24)):  # longer ids cannot be valid; the round-trip check rejects them
            d = cp[:, j] - ord("0")
            rows = np.where(j < us - 1, rows * 10 + d, rows)
            cols = np.where((j > us) & (j < length - 1), cols * 10 + d, cols)
        idx = np.arange(len(cp))
        rows = np.where(cp[idx, np.maximum(us - 1, 0)] == ord("D"), -rows, rows).reshape(s.shape)
        cols = np.where(cp[idx, np.maximum(length - 1, 0)] == ord("L"), -cols, cols).reshape(s.shape)
        try:
            if not np.all(format_cell(rows, cols) == s):
                rows = None
        except GridError:
            rows = None
    if rows is None:
        # slow path: the per-id parser names the first malformed id; ids that parse but do not exist
        # (row or column out of range) are reported by the caller's existence check
        rc = np.array([_parse_one(x) for x in s.ravel().tolist()], dtype=np.int64).reshape(s.shape + (2,))
        rows, cols = rc[..., 0], rc[..., 1]
    return rows, cols


def _row_index(row_u: np.ndarray, what: object) -> np.ndarray:
    t = _tables()
    ri = row_u - t.row_u0
    bad = (ri < 0) | (ri >= len(t.lats))
    if np.any(bad):
        first = what if np.ndim(what) == 0 else np.asarray(what)[bad][0]
        raise GridError(
            f"cell {first!r} does not exist: row outside the grid "
            f"({_name(t.row_u0, 'U', 'D')}..{_name(t.row_u0 + len(t.lats) - 1, 'U', 'D')})"
        )
    return ri


def _resolve(cell) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cell id(s) -> (row_u, col_r, row index, flat index into lons); validates existence."""
    t = _tables()
    if isinstance(cell, str | np.str_):
        r, c = _parse_one(cell)
        rows, cols = np.array(r), np.array(c)
    else:
        arr = np.asarray(cell)
        if arr.dtype.kind not in "UO":
            raise GridError(f"cell ids must be strings like '454U_120R', got an array of {arr.dtype}")
        if arr.dtype.kind == "O":
            for x in arr.ravel().tolist():
                if not isinstance(x, str):
                    _parse_one(x)
        rows, cols = _parse_many(arr)
    ri = _row_index(rows, cell)
    k = cols + t.zero_idx[ri]
    bad = (k < 0) | (k >= t.counts[ri])
    if np.any(bad):
        idx = np.flatnonzero(np.ravel(bad))[0]
        name = cell if np.ndim(cell) == 0 else np.ravel(np.asarray(cell))[idx]
        rr = int(np.ravel(ri)[idx])
        lo, hi = -int(t.zero_idx[rr]), int(t.counts[rr] - 1 - t.zero_idx[rr])
        raise GridError(
            f"cell {str(name)!r} does not exist: row {_name(t.row_u0 + rr, 'U', 'D')} has "
            f"{int(t.counts[rr])} columns, {_name(lo, 'R', 'L')}..{_name(hi, 'R', 'L')}"
        )
    return rows, cols, ri, t.offsets[ri] + k


def parse_cell(cell):
    """``"454U_120R"`` -> (454, 120) signed ints; arrays of ids -> two int64 arrays.

    Raises :class:`GridError` for malformed ids and for cells that do not exist (row beyond 946U/946D,
    column beyond that row's count, ``0D`` / ``0L``).
    """
    rows, cols, _, _ = _resolve(cell)
    if rows.ndim == 0:
        return int(rows), int(cols)
    return rows, cols


def n_columns(row_u) -> int | np.ndarray:
    """Number of columns of the row(s) ``row_u`` (signed)."""
    r = np.asarray(row_u, dtype=np.int64)
    out = _tables().counts[_row_index(r, row_u)]
    return int(out) if out.ndim == 0 else out


def row_range() -> tuple[int, int]:
    """(lowest, highest) signed row number: (-946, 946)."""
    t = _tables()
    return t.row_u0, t.row_u0 + len(t.lats) - 1


def column_range(row_u: int) -> tuple[int, int]:
    """(lowest, highest) signed column of row ``row_u``. Shifted rows run (n/2-1)L .. (n/2)R."""
    t = _tables()
    ri = int(_row_index(np.asarray(row_u, dtype=np.int64), row_u))
    return -int(t.zero_idx[ri]), int(t.counts[ri] - 1 - t.zero_idx[ri])


# ------------------------------------------------------------------------------------------ location


def _validate_points(lat, lon) -> tuple[np.ndarray, np.ndarray]:
    la = np.asarray(lat, dtype=np.float64)
    lo = np.asarray(lon, dtype=np.float64)
    la, lo = np.broadcast_arrays(la, lo)
    t = _tables()
    bad = ~np.isfinite(la) | ~np.isfinite(lo) | (la > LAT_LIMIT) | (la <= t.lats[0]) | (np.abs(lo) > 180.0)
    if np.any(bad):
        i = np.flatnonzero(np.ravel(bad))[0]
        p = (float(np.ravel(la)[i]), float(np.ravel(lo)[i]))
        raise GridError(
            f"point (lat={p[0]!r}, lon={p[1]!r}) is outside the Major TOM grid: lat must be in "
            f"({t.lats[0]!r}, {LAT_LIMIT}] (the lowest row line to the official limit) and lon in "
            f"[-180, 180]; {int(np.count_nonzero(bad))} bad point(s)"
        )
    return la, lo


def latlon_to_rowcol(lat, lon):
    """Point(s) -> signed (row_u, col_r) of the containing cell, exactly as the official ``latlon2rowcol``.

    Scalars give ints, arrays give int64 arrays (broadcast). Raises :class:`GridError` for non-finite
    points, lat > 85, lat at or south of the lowest row line (-84.97006; the official code wraps these to
    946U) and |lon| > 180. lon = -180 and +180 both map to the cell that spans the antimeridian.
    """
    la, lo = _validate_points(lat, lon)
    t = _tables()
    ri = np.searchsorted(t.lats, la, side="left") - 1  # >= 0 after validation
    n = t.counts[ri]
    off = t.offsets[ri]
    first = t.lons[off]
    # closed-form guess of "largest k with lons[k] < lon", then exact correction against the official floats
    k = np.ceil((lo - first) * (n / 360.0)).astype(np.int64) - 1
    k = np.clip(k, -1, n - 1)
    while True:
        up = (k + 1 < n) & (t.lons[np.minimum(off + k + 1, off + n - 1)] < lo)
        down = (k >= 0) & (t.lons[off + np.maximum(k, 0)] >= lo)
        if not (up.any() or down.any()):
            break
        k += up.astype(np.int64) - down.astype(np.int64)
    k = np.where(k < 0, n - 1, k)  # official: searchsorted()-1 == -1 wraps to the last column
    rows = ri + t.row_u0
    cols = k - t.zero_idx[ri]
    if rows.ndim == 0:
        return int(rows), int(cols)
    return rows, cols


def latlon_to_cell(lat, lon):
    """Point(s) -> cell id(s) like ``"454U_120R"`` (scalars -> str, arrays -> numpy str array)."""
    rows, cols = latlon_to_rowcol(lat, lon)
    return format_cell(rows, cols)


def cell_bottom_left(cell):
    """Cell id(s) -> the official grid point (lat, lon) in degrees: the BOTTOM-LEFT corner of the cell."""
    _, _, ri, flat = _resolve(cell)
    t = _tables()
    lat, lon = t.lats[ri], t.lons[flat]
    if lat.ndim == 0:
        return float(lat), float(lon)
    return lat, lon


def cell_bounds(cell) -> tuple[float, float, float, float]:
    """Geographic box (lat_min, lon_min, lat_max, lon_max) of one cell, as the official footprint.

    Like ``get_bounded_footprint``, the top row and last column reuse the previous spacing, so the last
    column's box can extend past +180 (no wrapping).
    """
    _, _, ri, flat = _resolve(cell)
    t = _tables()
    ri, flat = int(ri), int(flat)
    bottom, left = float(t.lats[ri]), float(t.lons[flat])
    top = float(t.lats[ri + 1]) if ri + 1 < len(t.lats) else bottom + float(t.lats[ri] - t.lats[ri - 1])
    end = int(t.offsets[ri + 1])
    right = float(t.lons[flat + 1]) if flat + 1 < end else left + float(t.lons[flat] - t.lons[flat - 1])
    return bottom, left, top, right


def utm_epsg_for(lat, lon):
    """The official ``get_utm_zone_from_latlng`` as int EPSG (vectorised), with the Norway/Svalbard zones.

    zone = floor((lon + 180) / 6) % 60 + 1; 56 <= lat < 64 and 3 <= lon < 12 -> 32; 72 <= lat < 84:
    [0, 9) -> 31, [9, 21) -> 33, [21, 33) -> 35, [33, 42) -> 37. 327zz if lat < 0 else 326zz.
    """
    la = np.asarray(lat, dtype=np.float64)
    lo = np.asarray(lon, dtype=np.float64)
    zone = np.mod(np.floor((lo + 180.0) / 6.0).astype(np.int64), 60) + 1
    zone = np.where((la >= 56.0) & (la < 64.0) & (lo >= 3.0) & (lo < 12.0), 32, zone)
    sval = (la >= 72.0) & (la < 84.0)
    for lo_min, lo_max, z in ((0.0, 9.0, 31), (9.0, 21.0, 33), (21.0, 33.0, 35), (33.0, 42.0, 37)):
        zone = np.where(sval & (lo >= lo_min) & (lo < lo_max), z, zone)
    epsg = np.where(la < 0, 32700, 32600) + zone
    return int(epsg) if epsg.ndim == 0 else epsg


def cell_utm_epsg(cell):
    """The grid's UTM EPSG of the cell(s) (decided on the bottom-left corner, like ``Grid.points.epsg``).

    Core-DEM uses this CRS; S2 and S1 samples keep their source product's zone, which differs for ~2.5% of
    cells: pass the sample's own ``crs`` to the footprint functions when you have it.
    """
    lat, lon = cell_bottom_left(cell)
    return utm_epsg_for(lat, lon)


def _corner_utm(cell, epsg) -> tuple[np.ndarray, np.ndarray, object]:
    lat, lon = cell_bottom_left(cell)
    if epsg is None:
        epsg = utm_epsg_for(lat, lon)
    if np.ndim(epsg) == 0:
        x0, y0 = utm_forward(lat, lon, _epsg_int(epsg))
    else:
        ep = np.asarray(epsg)
        if ep.shape != np.shape(lat):
            raise GridError(f"epsg has shape {ep.shape} but the cells have shape {np.shape(lat)}")
        x0 = np.empty(np.shape(lat))
        y0 = np.empty(np.shape(lat))
        for code in np.unique(ep):
            m = ep == code
            x0[m], y0[m] = utm_forward(np.asarray(lat)[m], np.asarray(lon)[m], _epsg_int(code))
    return x0, y0, epsg


def _epsg_int(epsg) -> int:
    zone, south = epsg_zone(epsg)
    return (32700 if south else 32600) + zone


def cell_centre(cell, epsg=None):
    """The published ``centre_lat/centre_lon``: inverse-UTM of (x0 + 5000, y0 + 5000) in ``epsg``.

    ``(x0, y0)`` is the bottom-left grid point projected into ``epsg`` (default: the grid's zone for the
    cell; pass the sample's ``crs`` to reproduce an S2/S1 metadata row). Scalars -> (lat, lon) floats;
    arrays of cells (with a scalar or per-cell ``epsg``) -> two arrays.
    """
    x0, y0, epsg = _corner_utm(cell, epsg)
    half = CELL_M / 2
    if np.ndim(epsg) == 0:
        lat, lon = utm_inverse(x0 + half, y0 + half, _epsg_int(epsg))
    else:
        ep = np.asarray(epsg)
        lat, lon = np.empty(np.shape(x0)), np.empty(np.shape(x0))
        for code in np.unique(ep):
            m = ep == code
            lat[m], lon[m] = utm_inverse(x0[m] + half, y0[m] + half, _epsg_int(code))
    if np.ndim(lat) == 0:
        return float(lat), float(lon)
    return lat, lon


# ------------------------------------------------------------------------------------ sample footprint


def patch_window(patch: int | str, size: int = RASTER_PX) -> tuple[int, int, int]:
    """Pixel window (col_off, row_off, side) of a sample inside the ``size`` px (default 1068) raster.

    ``patch`` 0..15: the release's 4x4 row-major patches of the centred 1024 crop (offset 22 =
    torchvision ``CenterCrop``'s ``round((1068-1024)/2)``); ``"center"``: the single centred 256 crop
    (offset 406, as ``--center_crop``). Only the published 1068 px geometry is defined here.
    """
    if size != RASTER_PX:
        raise GridError(f"patch windows are defined on the published {RASTER_PX} px raster, not {size}")
    crop_off = int(round((RASTER_PX - CROP_PX) / 2.0))
    if isinstance(patch, str):
        if patch != "center":
            raise GridError(f"patch must be 0..{N_PATCHES - 1} or 'center', got {patch!r}")
        off = crop_off + (CROP_PX - PATCH_PX) // 2
        return off, off, PATCH_PX
    if isinstance(patch, bool) or not isinstance(patch, int | np.integer) or not 0 <= patch < N_PATCHES:
        raise GridError(f"patch must be 0..{N_PATCHES - 1} or 'center', got {patch!r}")
    prow, pcol = divmod(int(patch), PATCH_GRID)
    return crop_off + pcol * PATCH_PX, crop_off + prow * PATCH_PX, PATCH_PX


@dataclass(frozen=True)
class SampleFootprint:
    """Where a Major TOM sample's pixels lie: the 1068 px raster of one cell in one UTM CRS."""

    cell: str
    epsg: int
    x0: float  # bottom-left grid point, projected (m)
    y0: float

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the full raster: [x0-340, y0-340, x0+10340, y0+10340] m."""
        return (
            self.x0 - PADDING_M,
            self.y0 - PADDING_M,
            self.x0 + CELL_M + PADDING_M,
            self.y0 + CELL_M + PADDING_M,
        )

    def geotransform(self, pixel_m: float = PIXEL_M) -> tuple[float, float, float, float, float, float]:
        """GDAL-order (x_ul, pixel_m, 0, y_ul, 0, -pixel_m); 10 m (1068 px) or 30 m (DEM, 356 px)."""
        xmin, _, _, ymax = self.bounds
        return (xmin, pixel_m, 0.0, ymax, 0.0, -pixel_m)

    def pixel_to_utm(self, col, row, pixel_m: float = PIXEL_M) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-corner coordinates (col, row; (0, 0) = upper-left corner of the raster) -> UTM metres."""
        xmin, _, _, ymax = self.bounds
        x = xmin + np.asarray(col, dtype=np.float64) * pixel_m
        y = ymax - np.asarray(row, dtype=np.float64) * pixel_m
        return x, y

    def patch_bounds_utm(self, patch: int | str) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) in metres of patch 0..15 or ``"center"`` (see :func:`patch_window`)."""
        col, row, side = patch_window(patch)
        x_left, y_top = self.pixel_to_utm(col, row)
        return float(x_left), float(y_top - side * PIXEL_M), float(x_left + side * PIXEL_M), float(y_top)

    def patch_corners_latlon(self, patch: int | str) -> np.ndarray:
        """(4, 2) array of the patch corners' (lat, lon): upper-left, upper-right, lower-right, lower-left."""
        xmin, ymin, xmax, ymax = self.patch_bounds_utm(patch)
        lat, lon = utm_inverse([xmin, xmax, xmax, xmin], [ymax, ymax, ymin, ymin], self.epsg)
        return np.stack([lat, lon], axis=-1)

    def patch_bounds_latlon(self, patch: int | str) -> tuple[float, float, float, float]:
        """Geographic box (lat_min, lon_min, lat_max, lon_max) of a patch.

        The UTM square is not a lat/lon box; the box of its 4 corners is exact to < 1e-6 deg at 2.56 km
        (edges curve by far less than that). Near the antimeridian lon_min > lon_max means it wraps.
        """
        c = self.patch_corners_latlon(patch)
        lat, lon = c[:, 0], c[:, 1]
        if lon.max() - lon.min() > 180.0:  # straddles the antimeridian: report a wrapping box
            return float(lat.min()), float(lon[lon > 0].min()), float(lat.max()), float(lon[lon < 0].max())
        return float(lat.min()), float(lon.min()), float(lat.max()), float(lon.max())

    def patch_centre_latlon(self, patch: int | str) -> tuple[float, float]:
        """(lat, lon) of the centre of a patch."""
        xmin, ymin, xmax, ymax = self.patch_bounds_utm(patch)
        lat, lon = utm_inverse((xmin + xmax) / 2, (ymin + ymax) / 2, self.epsg)
        return float(lat), float(lon)

    def centre_latlon(self) -> tuple[float, float]:
        """The metadata ``centre_lat/centre_lon`` of this sample (cell centre in this CRS)."""
        lat, lon = utm_inverse(self.x0 + CELL_M / 2, self.y0 + CELL_M / 2, self.epsg)
        return float(lat), float(lon)


def sample_footprint(cell: str, epsg: int | str | None = None) -> SampleFootprint:
    """The footprint of ``cell``'s published raster in ``epsg`` (default: the grid's UTM zone of the cell).

    ``epsg`` accepts ``32633``, ``"EPSG:32633"`` and the published typo ``"EPSG:EPSG:32633"``.
    """
    if not isinstance(cell, str | np.str_):
        raise GridError(f"sample_footprint takes one cell id, got {type(cell).__name__}")
    x0, y0, ep = _corner_utm(cell, epsg)
    return SampleFootprint(str(cell).strip(), _epsg_int(ep), float(x0), float(y0))
