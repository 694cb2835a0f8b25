"""The Major TOM grid vs the official golden table; edge cases, errors, real GeoTIFF georeferencing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from copgen.storage.majortom import grid
from copgen.storage.majortom.grid import GridError
from copgen.storage.majortom.utm import UTMError, epsg_zone, utm_forward, utm_inverse


@pytest.fixture(scope="module")
def table(reference_dir: Path) -> pd.DataFrame:
    return pd.read_csv(reference_dir / "majortom_grid_reference.csv")


@pytest.fixture(scope="module")
def sidecar(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "majortom_grid_reference.json").read_text())


def _wrapped(df: pd.DataFrame) -> np.ndarray:
    """Rows where the official code wrapped a southern point to a northern row (we reject those)."""
    return ((df.lat < 0) & (df.row_u > 0)).to_numpy()


def test_every_reference_row_vectorised(table: pd.DataFrame) -> None:
    # Cells, rows, columns and EPSG codes are integers and strings: exact, as the reference README asks.
    # The construction avoids CPU-level-dependent maths (IEEE arithmetic, sort, scalar cos: see grid.py).
    ok = table[~_wrapped(table)]
    cells = grid.latlon_to_cell(ok.lat.to_numpy(), ok.lon.to_numpy())
    np.testing.assert_array_equal(cells, ok.grid_cell.to_numpy().astype(str))
    rows, cols = grid.latlon_to_rowcol(ok.lat.to_numpy(), ok.lon.to_numpy())
    np.testing.assert_array_equal(rows, ok.row_u.to_numpy())
    np.testing.assert_array_equal(cols, ok.col_r.to_numpy())
    # parse the published ids back and locate their corners and zones
    prow, pcol = grid.parse_cell(ok.grid_cell.to_numpy())
    np.testing.assert_array_equal(prow, ok.row_u.to_numpy())
    np.testing.assert_array_equal(pcol, ok.col_r.to_numpy())
    lat0, lon0 = grid.cell_bottom_left(ok.grid_cell.to_numpy())
    np.testing.assert_allclose(lat0, ok.cell_bottom_left_lat.to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(lon0, ok.cell_bottom_left_lon.to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(grid.cell_utm_epsg(ok.grid_cell.to_numpy()), ok.utm_epsg.to_numpy())
    np.testing.assert_array_equal(grid.format_cell(prow, pcol), ok.grid_cell.to_numpy().astype(str))


def test_every_case_scalar_path(table: pd.DataFrame) -> None:
    """The scalar path returns plain Python types and agrees row by row (one row per case)."""
    ok = table[~_wrapped(table)].drop_duplicates("case")
    for row in ok.itertuples():
        cell = grid.latlon_to_cell(row.lat, row.lon)
        assert isinstance(cell, str) and cell == row.grid_cell, row
        assert grid.latlon_to_rowcol(row.lat, row.lon) == (row.row_u, row.col_r)
        assert grid.parse_cell(cell) == (row.row_u, row.col_r)
        lat0, lon0 = grid.cell_bottom_left(cell)
        assert isinstance(lat0, float) and abs(lat0 - row.cell_bottom_left_lat) <= 1e-9
        assert abs(lon0 - row.cell_bottom_left_lon) <= 1e-9
        assert grid.cell_utm_epsg(cell) == row.utm_epsg


def test_shifted_antimeridian_rows(table: pd.DataFrame, sidecar: dict) -> None:
    shifted = table[table.case == "shifted_row_antimeridian"]
    assert len(shifted) > 0
    cells = grid.latlon_to_cell(shifted.lat.to_numpy(), shifted.lon.to_numpy())
    np.testing.assert_array_equal(cells, shifted.grid_cell.to_numpy().astype(str))
    # exactly the sidecar's rows have the shifted column range (n/2-1)L .. (n/2)R
    lo_row, hi_row = grid.row_range()
    found = []
    for r in range(lo_row, hi_row + 1):
        n = grid.n_columns(r)
        lo, hi = grid.column_range(r)
        assert hi - lo + 1 == n
        if (lo, hi) != (-(n // 2), n - 1 - n // 2):
            assert n % 2 == 0 and (lo, hi) == (-(n // 2 - 1), n // 2), r
            found.append(grid.format_cell(r, 0).split("_")[0])
    assert sorted(found) == sorted(sidecar["facts"]["shifted_rows"])


def test_grid_facts(sidecar: dict) -> None:
    facts = sidecar["facts"]
    lo, hi = grid.row_range()
    assert hi - lo + 1 == facts["n_rows"]
    assert grid.format_cell(lo, 0).startswith(facts["first_row"] + "_")
    assert grid.format_cell(hi, 0).startswith(facts["last_row"] + "_")
    counts = grid.n_columns(np.arange(lo, hi + 1))
    assert int(counts.sum()) == facts["n_cells"]
    assert grid.cell_bottom_left(grid.format_cell(lo, 0))[0] == facts["lat_min_row_line"]
    assert grid.cell_bottom_left(grid.format_cell(hi, 0))[0] == facts["lat_max_row_line"]


def test_south_wrap_points_are_rejected(table: pd.DataFrame) -> None:
    wrapped = table[_wrapped(table)]
    assert set(table.index[table.case == "south_wrap_quirk"]) <= set(wrapped.index)
    for row in wrapped.itertuples():
        with pytest.raises(GridError, match="outside the Major TOM grid"):
            grid.latlon_to_cell(row.lat, row.lon)
    # one bad point poisons an array call, and the message names it
    good = table[~_wrapped(table)].iloc[:3]
    lats = np.concatenate([good.lat.to_numpy(), wrapped.lat.to_numpy()[:1]])
    lons = np.concatenate([good.lon.to_numpy(), wrapped.lon.to_numpy()[:1]])
    with pytest.raises(GridError, match=re.escape(repr(float(wrapped.lat.iloc[0])))):
        grid.latlon_to_cell(lats, lons)


@pytest.mark.parametrize(
    "lat, lon", [(85.0001, 0.0), (-89.0, 10.0), (np.nan, 0.0), (10.0, np.inf), (10.0, 180.5), (0.0, -181.0)]
)
def test_points_outside_the_grid(lat: float, lon: float) -> None:
    with pytest.raises(GridError, match="outside the Major TOM grid"):
        grid.latlon_to_rowcol(lat, lon)


def test_lines_belong_to_the_cell_below_and_west() -> None:
    assert grid.latlon_to_cell(0.0, 0.0) == "1D_1L"
    lat0, lon0 = grid.cell_bottom_left("454U_120R")
    assert grid.latlon_to_cell(lat0, lon0).startswith("453U_")
    assert grid.latlon_to_cell(lat0 + 1e-9, lon0) == "454U_119R"
    assert grid.latlon_to_cell(lat0 + 1e-9, lon0 + 1e-9) == "454U_120R"
    # both antimeridian longitudes give the same (last) column in an ordinary row
    assert grid.latlon_to_cell(45.0, -180.0) == grid.latlon_to_cell(45.0, 180.0)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("454u_120R", "malformed"),
        ("454U-120R", "malformed"),
        ("0454U_120R", "malformed"),
        (" 454U_120R", "malformed"),
        ("", "malformed"),
        ("0D_5R", "no row '0D'"),
        ("5U_0L", "column '0L'"),
        ("947U_1R", "row outside the grid"),
        ("946D_177R", "946D has 352 columns, 176L..175R"),
        ("454U_1518R", "454U has 3035 columns"),
    ],
)
def test_parse_errors(bad: str, message: str) -> None:
    with pytest.raises(GridError, match=re.escape(message)):
        grid.parse_cell(bad)
    with pytest.raises(GridError, match=re.escape(message)):
        grid.cell_bottom_left(np.array(["454U_120R", bad]))


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(GridError, match="string"):
        grid.parse_cell(454)
    with pytest.raises(GridError, match="strings"):
        grid.parse_cell(np.array([1, 2]))
    with pytest.raises(GridError, match="string"):
        grid.parse_cell(np.array(["454U_120R", None], dtype=object))


def test_column_count_matches_parse_limits() -> None:
    """The last column of a row parses; one more raises (for an odd, an even and a shifted row)."""
    for r in (454, -946, 800):
        lo, hi = grid.column_range(r)
        assert grid.parse_cell(grid.format_cell(r, hi)) == (r, hi)
        assert grid.parse_cell(grid.format_cell(r, lo)) == (r, lo)
        with pytest.raises(GridError, match="does not exist"):
            grid.parse_cell(grid.format_cell(r, hi + 1))
        with pytest.raises(GridError, match="does not exist"):
            grid.parse_cell(grid.format_cell(r, lo - 1))


def test_utm_round_trip_and_zone_parsing() -> None:
    rng = np.random.default_rng(1)
    lat = rng.uniform(-80, 84, 2000)
    dlon = rng.uniform(-6, 6, 2000)  # up to a zone away from the central meridian
    for epsg in (32601, 32633, 32760):
        zone, south = epsg_zone(epsg)
        lon = -183.0 + 6 * zone + dlon
        x, y = utm_forward(lat, lon, epsg)
        lat2, lon2 = utm_inverse(x, y, epsg)
        np.testing.assert_allclose(lat2, lat, atol=1e-10)
        wrapped = np.mod(lon2 - lon + 180, 360) - 180
        np.testing.assert_allclose(wrapped, 0, atol=1e-10)
    assert epsg_zone("EPSG:EPSG:32633") == (33, False)
    for bad in ("EPSG:4326", 32661, "32700", "utm"):
        with pytest.raises(UTMError):
            epsg_zone(bad)


def test_cell_centre_is_the_utm_centre() -> None:
    cells = np.array(["454U_120R", "922D_249L", "1D_1L", "800U_624R", "868U_30R"])
    lat, lon = grid.cell_centre(cells)
    for cell, la, lo in zip(cells, lat, lon, strict=True):
        fp = grid.sample_footprint(str(cell))
        assert fp.centre_latlon() == pytest.approx((la, lo), abs=1e-12)
        x, y = utm_forward(la, lo, fp.epsg)
        assert abs(x - (fp.x0 + 5000)) < 1e-6 and abs(y - (fp.y0 + 5000)) < 1e-6
        b = grid.cell_bounds(str(cell))
        # the UTM centre lies inside the geographic cell (the padded square is nearly aligned)
        lo_wrapped = lo if lo >= b[1] else lo + 360
        assert b[0] < la < b[2] and b[1] < lo_wrapped < b[3]
    # a per-cell CRS (e.g. the S2 product's zone) is honoured
    lat_other, lon_other = grid.cell_centre(cells[:2], epsg=np.array([32634, "EPSG:EPSG:32702"]))
    assert abs(lat_other[0] - lat[0]) > 1e-6
    assert grid.cell_centre(str(cells[1]), "EPSG:32702") == pytest.approx(
        (lat_other[1], lon_other[1]), abs=1e-12
    )
    with pytest.raises(GridError, match="shape"):
        grid.cell_centre(cells[:2], epsg=np.array([32634]))
    with pytest.raises(UTMError, match="not a WGS84 UTM zone"):
        grid.sample_footprint("454U_120R", "EPSG:3857")


def test_patch_windows() -> None:
    windows = [grid.patch_window(p) for p in range(grid.N_PATCHES)]
    assert windows[0][:2] == (22, 22) and windows[-1][:2] == (22 + 3 * 256, 22 + 3 * 256)
    assert windows[1][:2] == (22 + 256, 22)  # row-major: patch 1 is to the right of patch 0
    assert grid.patch_window("center") == (406, 406, 256)
    for bad in (16, -1, "centre", True, 1.0):
        with pytest.raises(GridError):
            grid.patch_window(bad)


def _readme_crops(real_dir: Path) -> list[tuple[str, str, int, float, float]]:
    """(file, cell, epsg, centre lat, centre lon) from the table in real/README.md."""
    out = []
    pat = re.compile(
        r"^\| `(?P<file>[^`]+\.tif)` \| (?P<cell>\S+) \| EPSG:(?P<epsg>\d+) \| [^|]+ \| "
        r"(?P<lat>-?[\d.]+), (?P<lon>-?[\d.]+) \("
    )
    for line in (real_dir / "README.md").read_text().splitlines():
        m = pat.match(line)
        if m:
            out.append((m["file"], m["cell"], int(m["epsg"]), float(m["lat"]), float(m["lon"])))
    assert len(out) >= 4
    return out


def test_real_geotiff_georeferencing(real_dir: Path) -> None:
    """Tiepoints of the real TerraMesh crops sit on the footprint rule: (x0-340 + 2640a, y0+10340 - 2640b)."""
    import tifffile

    for fname, cell, epsg, clat, clon in _readme_crops(real_dir):
        a, b = (int(v) for v in Path(fname).stem.split("_")[-2:])
        with tifffile.TiffFile(real_dir / fname) as tf:
            page = tf.pages[0]
            tie = page.tags["ModelTiepointTag"].value
            scale = page.tags["ModelPixelScaleTag"].value
            geokeys = tf.geotiff_metadata
            height = page.shape[0]
        assert Path(fname).stem.startswith(cell)
        assert int(geokeys["ProjectedCSTypeGeoKey"]) == epsg == grid.cell_utm_epsg(cell)
        assert scale[0] == scale[1] == grid.PIXEL_M
        fp = grid.sample_footprint(cell, f"EPSG:{epsg}")
        x_ul, y_ul = fp.pixel_to_utm(264 * a, 264 * b)
        assert abs(tie[3] - x_ul) / scale[0] < 0.01 and abs(tie[4] - y_ul) / scale[1] < 0.01, fname
        # the README's centre of the crop (4 decimals) checks the inverse projection independently
        x_c, y_c = fp.pixel_to_utm(264 * a + height / 2, 264 * b + height / 2)
        lat, lon = utm_inverse(x_c, y_c, epsg)
        assert abs(lat - clat) <= 6e-5 and abs(lon - clon) <= 6e-5, fname
        # crop lies inside the 1068 px raster of its cell
        xmin, ymin, xmax, ymax = fp.bounds
        assert xmin <= tie[3] < xmax and ymin < tie[4] <= ymax


def test_patch_bounds_geometry() -> None:
    fp = grid.sample_footprint("454U_120R")
    xmin, ymin, xmax, ymax = fp.bounds
    assert xmax - xmin == ymax - ymin == grid.RASTER_PX * grid.PIXEL_M
    assert fp.geotransform() == (xmin, 10.0, 0.0, ymax, 0.0, -10.0)
    union = np.array([fp.patch_bounds_utm(p) for p in range(16)])
    assert union[:, 0].min() == xmin + 220 and union[:, 3].max() == ymax - 220
    assert union[:, 2].max() - union[:, 0].min() == grid.CROP_PX * grid.PIXEL_M
    c = fp.patch_bounds_utm("center")
    assert (c[0] + c[2]) / 2 == pytest.approx(fp.x0 + 5000) and (c[1] + c[3]) / 2 == pytest.approx(
        fp.y0 + 5000
    )
    assert fp.patch_centre_latlon("center") == pytest.approx(fp.centre_latlon(), abs=1e-12)
    lat_min, lon_min, lat_max, lon_max = fp.patch_bounds_latlon(5)
    plat, plon = fp.patch_centre_latlon(5)
    assert lat_min < plat < lat_max and lon_min < plon < lon_max
    assert grid.latlon_to_cell(*fp.centre_latlon()) == "454U_120R"
