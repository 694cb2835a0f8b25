"""Georeferencing of cube samples: checked against the real TerraMesh GeoTIFFs (independent georeferencing
of Major TOM crops in four UTM zones, both hemispheres) and read back by rasterio from the cube."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from copgen.storage.cubes import Cube, CubeSchemaError, CubeSpec
from copgen.storage.georef import GeorefError, sample_epsg, sample_georef
from copgen.storage.majortom import grid

# name suffix _a_b: the crop's upper-left pixel is at column 264a, row 264b of the 1068 px raster
# (shared/reference/real/README.md)
TIFS = {"282D_485L_3_3.tif": 32722, "38D_378R_2_3.tif": 32736, "433D_629L_3_1.tif": 32718,
        "637U_59R_1_3.tif": 32632}
# GeoTIFF tie points are stored as float64 from the same projection maths: 1 mm covers the 6th-order
# Krüger series error (< 1 mm, storage/majortom/utm.py) and the rounding of the published values
TOL_M = 1e-3


def _tif_origin(path) -> tuple[int, tuple[float, float]]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tie = page.tags["ModelTiepointTag"].value
        keys = list(page.tags["GeoKeyDirectoryTag"].value)
    epsg = next(keys[i + 3] for i in range(4, len(keys), 4) if keys[i] == 3072)
    return int(epsg), (float(tie[3]), float(tie[4]))


@pytest.mark.parametrize("name", sorted(TIFS))
def test_transform_matches_the_real_geotiffs(real_dir, name):
    cell = name.rsplit("_", 2)[0]
    a, b = (int(v) for v in name[:-4].rsplit("_", 2)[1:])
    epsg, (x_tif, y_tif) = _tif_origin(real_dir / name)
    assert epsg == TIFS[name]
    # the raster's upper-left corner from the file, then each patch's window inside it
    x_raster, y_raster = x_tif - 264 * a * 10.0, y_tif + 264 * b * 10.0
    patches = ["center", *range(16)]
    g = sample_georef([cell] * 17, patches, [epsg] * 17)
    assert (g.epsg == epsg).all()
    for i, p in enumerate(patches):
        col, row, side = grid.patch_window(p)
        want = (x_raster + col * 10.0, 10.0, 0.0, y_raster - row * 10.0, 0.0, -10.0)
        np.testing.assert_allclose(g.transform[i], want, rtol=0, atol=TOL_M, err_msg=f"{name} patch {p}")


def test_footprint_polygon_contains_the_centre_and_matches_corners():
    g = sample_georef(["454U_120R"], ["center"])
    lat, lon = grid.cell_centre("454U_120R")
    ring = [tuple(map(float, xy.split())) for xy in g.footprint[0][len("POLYGON (("):-2].split(", ")]
    assert len(ring) == 5 and ring[0] == ring[-1]
    lons, lats = np.array(ring)[:4, 0], np.array(ring)[:4, 1]
    # the centre crop is centred on the cell: its corners straddle the published centre
    assert lons.min() < lon < lons.max() and lats.min() < lat < lats.max()
    # WKT keeps 7 decimals (~1 cm)
    np.testing.assert_allclose(np.stack([lons, lats], -1), g.corners[0], rtol=0, atol=1e-7)


def test_small_thumbnails_and_small_samples_scale_the_pixel():
    # a synthetic world's 192 px thumbnails cut into 32 px samples: 10680/192 m per pixel, centre window
    # at (192 - 32) // 2 = 80 px (thumbnails.to_samples)
    g = sample_georef(["454U_120R", "454U_120R"], ["center", "5"], thumbnail_px=192, sample_px=32)
    xmin, _, _, ymax = grid.sample_footprint("454U_120R").bounds
    pix = 10680.0 / 192
    np.testing.assert_allclose(g.transform[0], (xmin + 80 * pix, pix, 0, ymax - 80 * pix, 0, -pix),
                               rtol=0, atol=TOL_M)
    # patch 5 = row 1, col 1 of the 4x4 grid over the centred 128 px crop (offset 32)
    np.testing.assert_allclose(g.transform[1], (xmin + 64 * pix, pix, 0, ymax - 64 * pix, 0, -pix),
                               rtol=0, atol=TOL_M)
    # published 1068 px thumbnails, 64 px model samples: the 256 px window resized, 40 m pixels
    g = sample_georef(["454U_120R"], ["center"], sample_px=64)
    assert g.transform[0][1] == pytest.approx(40.0, abs=1e-9)


def test_sample_epsg_prefers_the_s2_product_crs():
    rows = pd.DataFrame({"grid_cell": ["454U_120R", "454U_120R", "1D_1R"],
                         "S2L2A_crs": ["EPSG:32633", None, None],
                         "DEM_crs": ["EPSG:32632", "EPSG:EPSG:32634", None]})
    assert sample_epsg(rows).tolist() == [32633, 32634, grid.cell_utm_epsg("1D_1R")]
    with pytest.raises(GeorefError, match="454U_120R.*S2L2A_crs"):
        sample_epsg(rows.assign(S2L2A_crs=["EPSG:4326", None, None]))


def test_cube_stores_georef_that_rasterio_and_xarray_read(tmp_path):
    from rasterio.transform import Affine, array_bounds

    cube = Cube.create(str(tmp_path / "c.zarr"), CubeSpec(tile_size=256, block_samples=2))
    cube.grow(["637U_59R", "38D_378R"], ["center", "3"], epsg=[32632, 32736])
    ds = xr.open_zarr(tmp_path / "c.zarr")
    assert ds.epsg.values.tolist() == [32632, 32736]
    assert ds.transform.dims == ("sample", "affine") and ds.footprint.dims == ("sample",)
    fp = grid.sample_footprint("38D_378R", 32736)
    t = Affine.from_gdal(*ds.transform.values[1])
    # bounds of a 256 px tile (rasterio's own arithmetic) = the footprint's patch 3 box
    west, south, east, north = array_bounds(256, 256, t)
    np.testing.assert_allclose((west, south, east, north), fp.patch_bounds_utm(3), rtol=0, atol=TOL_M)
    assert ds.footprint.values[0].startswith("POLYGON ((9.8")


def test_grow_names_a_cell_outside_the_grid(tmp_path):
    cube = Cube.create(str(tmp_path / "c.zarr"), CubeSpec(tile_size=16, block_samples=2))
    with pytest.raises(CubeSchemaError, match="999U_1R"):
        cube.grow(["999U_1R"], ["center"])
