"""The synthetic Copernicus world: determinism, continuity, physical relations, missing rates, the layout."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from copgen import scene as sc
from copgen.modalities import Modality
from copgen.storage.majortom import grid, layout, thumbnails
from copgen.storage.majortom.reader import MajorTomReader
from copgen.storage.majortom.synthetic import (
    SyntheticWorld,
    SyntheticWorldError,
    dem_size_for,
    mgrs_tile,
    write_world,
)

SIZE = 96  # small thumbnails keep the module fast; the physics does not depend on the size


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    # origin chosen so the 2x2 rectangle holds lowland with lakes, rivers, fields and mountains
    return SyntheticWorld(7, (46.0, 8.0), 2, 2, thumbnail_size=SIZE, cloud_prob=0.0)


@pytest.fixture(scope="module")
def rendered(world):
    return {c: world.render(c, tuple(Modality)) for c in world.cells}


def test_cells_are_a_real_grid_rectangle(world):
    assert len(world.cells) == 4
    r0, c0 = grid.parse_cell(world.cells[0])
    assert world.cells[0] == grid.latlon_to_cell(46.0, 8.0)
    rows = {grid.parse_cell(c)[0] for c in world.cells}
    assert rows == {r0, r0 + 1}
    assert grid.parse_cell(world.cells[1]) == (r0, c0 + 1)


def test_same_seed_same_bytes_other_seed_differs(world, rendered):
    cell = world.cells[0]
    again = SyntheticWorld(7, (46.0, 8.0), 2, 2, thumbnail_size=SIZE, cloud_prob=0.0).render(
        cell, tuple(Modality)
    )
    other = SyntheticWorld(8, (46.0, 8.0), 2, 2, thumbnail_size=SIZE, cloud_prob=0.0).render(
        cell, tuple(Modality)
    )
    for m in Modality:
        assert rendered[cell].thumbnails[m].tobytes() == again.thumbnails[m].tobytes(), m
        assert rendered[cell].thumbnails[m].tobytes() != other.thumbnails[m].tobytes(), m
    assert rendered[cell].scene.vv.tobytes() == again.scene.vv.tobytes()
    assert world.acquisition(cell) == SyntheticWorld(7, (46.0, 8.0), 2, 2).acquisition(cell)


def _bilinear(img: np.ndarray, xmin: float, ymax: float, pix: float, x: np.ndarray, y: np.ndarray):
    col = np.clip((x - xmin) / pix - 0.5, 0, img.shape[1] - 1.001)
    row = np.clip((ymax - y) / pix - 0.5, 0, img.shape[0] - 1.001)
    c0, r0 = col.astype(int), row.astype(int)
    fc, fr = col - c0, row - r0
    top = img[r0, c0] * (1 - fc) + img[r0, c0 + 1] * fc
    bottom = img[r0 + 1, c0] * (1 - fc) + img[r0 + 1, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def test_dem_continuous_across_neighbouring_cells(world, rendered):
    """Footprints overlap (680 m padding) and the ground is sampled in world coordinates: where two
    cells see the same place, their DEMs agree; elsewhere they do not."""
    for a, b in ((world.cells[0], world.cells[1]), (world.cells[0], world.cells[2])):
        dem_a, dem_b = rendered[a].scene.elevation.astype(float), rendered[b].scene.elevation.astype(float)
        n = dem_a.shape[0]
        ax0, _, _, ay1 = world.footprint(a).bounds
        bx0, _, _, by1 = world.footprint(b).bounds
        pix = (world.footprint(a).bounds[2] - ax0) / n
        centres = (np.arange(n) + 0.5) * pix
        if b == world.cells[1]:  # east neighbour: b's first column lies inside a
            x, y, edge_b = np.full(n, bx0 + 0.5 * pix), by1 - centres, dem_b[:, 0]
        else:  # north neighbour: b's last row lies inside a
            x, y, edge_b = bx0 + centres, np.full(n, by1 - (n - 0.5) * pix), dem_b[-1, :]
        inside = (x > ax0 + pix) & (x < ax0 + (n - 1) * pix) & (y < ay1 - pix) & (y > ay1 - (n - 1) * pix)
        assert inside.sum() > n // 2
        seen_by_a = _bilinear(dem_a, ax0, ay1, pix, x, y)[inside]
        relief = float(np.ptp(dem_a)) + 1.0
        mismatch = float(np.abs(seen_by_a - edge_b[inside]).mean())
        unrelated = float(np.abs(dem_a[::-1, ::-1][:, 0][inside] - edge_b[inside]).mean())
        assert mismatch < 0.03 * relief, (a, b, mismatch, relief)
        assert mismatch < 0.25 * unrelated, (a, b, mismatch, unrelated)


def test_physical_relations(rendered):
    lc = np.concatenate([r.scene.land_cover.ravel() for r in rendered.values()])
    l2a = np.concatenate([r.scene.l2a.reshape(4, -1) for r in rendered.values()], axis=1).astype(float)
    l1c = np.concatenate([r.scene.l1c.reshape(4, -1) for r in rendered.values()], axis=1).astype(float)
    vv = np.concatenate([r.scene.vv.ravel() for r in rendered.values()]).astype(float)
    vh = np.concatenate([r.scene.vh.ravel() for r in rendered.values()]).astype(float)
    water, forest, land = lc == sc.LandCover.WATER, lc == sc.LandCover.FOREST, lc != sc.LandCover.WATER
    assert water.mean() > 0.002 and forest.mean() > 0.02, "the test world must hold water and forest"
    b04, b08 = sc.S2_BANDS.index("B04"), sc.S2_BANDS.index("B08")
    # water: dark in radar (specular) and in S2 red/NIR (absorbs)
    assert np.median(vv[water]) < 0.3 * np.median(vv[land])
    assert np.median(l2a[b08][water]) < 0.3 * np.median(l2a[b08][land])
    assert np.median(l2a[b04][water]) < np.median(l2a[b04][land])
    # the atmosphere adds path radiance, most in blue
    gain = (l1c - l2a).mean(axis=1)
    assert gain[0] > 0 and gain[0] == gain.max()
    # volume scattering: VH/VV higher over forest than over water
    assert np.median(vh[forest] / vv[forest]) > 1.3 * np.median(vh[water] / vv[water])


def test_cast_shadows_fall_behind_ridges_away_from_the_sun():
    # a north-south ridge 1,000 m high in the middle of flat ground, 100 m pixels; the sun in the east
    x = np.arange(41)
    elevation = np.tile(np.maximum(0.0, 1000.0 - 250.0 * np.abs(x - 20.0)), (5, 1))
    east_low = sc.Sun(zenith_deg=45.0, azimuth_deg=90.0)  # the ray rises 100 m per 100 m pixel
    shadow = sc.cast_shadow(elevation, 100.0, east_low)
    assert shadow[2, 16:20].all() and not shadow[2, 21:].any()  # the west side, behind the ridge
    assert shadow[2, 11] and not shadow[2, 9]  # 1,000 m high at 45 deg: 1 km of shadow from the crest
    assert not sc.cast_shadow(elevation, 100.0, sc.Sun(zenith_deg=10.0, azimuth_deg=90.0))[2, :19].any()
    # the direct light goes, the sky light stays
    slope, aspect = sc.slope_aspect(elevation, 100.0)
    lit = sc.illumination(slope, aspect, east_low)
    shaded = sc.illumination(slope, aspect, east_low, shadow)
    assert 0 < shaded[2, 12] < 0.25 * lit[2, 12]
    assert np.array_equal(shaded[~shadow], lit[~shadow])  # exact: the same arithmetic where unshadowed


def test_s2_shading_follows_the_dem_hillshade_in_steep_terrain():
    # the sun in the SE lights the slopes the hillshade (light from the NW) darkens: illumination and the
    # published DEM encoding are anti-correlated, which is what lets a model infer relief from S2
    xs = np.arange(128) * 83.4
    corr = []
    for ox in range(0, 400_000, 10_680):  # steep cells of the bundled model's training world
        ter = sc.terrain(xs + ox, 5_200_000.0 - xs, 20261127, 83.4)
        slope, aspect = sc.slope_aspect(ter.elevation, 83.4)
        if np.degrees(slope).mean() > 15:
            illum = sc.illumination(slope, aspect, sc.sun_position(46.3, 180))
            hillshade = thumbnails.dem_thumbnail(ter.elevation * (30.0 / 83.4)).astype(float)
            corr.append(np.corrcoef(illum.ravel(), hillshade.ravel())[0, 1])
    assert len(corr) >= 10, "not enough steep cells along the search line"
    assert max(corr) < 0 and np.mean(corr) < -0.4, corr


def test_snow_only_high_up():
    # a mountain world; snow (bright S2) sits above the snowline and nowhere in the lowland
    xs = np.arange(200) * 250.0  # 50 km: wide enough to hold a mountain range
    for seed in range(40):
        ter = sc.terrain(xs, xs[::-1], seed, 250.0)
        if ter.elevation.max() > 2700:
            break
    else:
        pytest.fail("no mountain world among 40 seeds")
    slope, aspect = sc.slope_aspect(ter.elevation, 250.0)
    lc = sc.land_cover(xs, xs[::-1], seed, ter, slope, aspect)
    snow = lc == sc.LandCover.SNOW
    assert snow.any()
    assert ter.elevation[snow].min() > 1500.0
    assert not snow[ter.elevation < 1500.0].any()


def test_snow_bright_in_s2_at_elevation():
    spec_kw = dict(extent_m=10680.0, size=64, coarse_size=32, scene_key=1, cloud_fraction=0.0, aerosol=1.0)
    sun = sc.sun_position(46.0, 200)
    radar = sc.RadarGeometry(280.0)
    for seed in range(60):
        for ox in range(0, 200_000, 20_000):
            xs = ox + (np.arange(32) + 0.5) * 333.75
            if sc.terrain(xs, 5_100_000.0 - xs + ox, seed, 333.75).elevation.max() < 2900:
                continue
            scene = sc.render_scene(
                sc.SceneSpec(xmin=ox, ymax=5_100_000.0, world_seed=seed, sun=sun, radar=radar, **spec_kw)
            )
            snow = scene.land_cover == sc.LandCover.SNOW
            if snow.mean() > 0.01:
                other = ~snow & (scene.land_cover != sc.LandCover.WATER)
                assert np.median(scene.l2a[1][snow]) > 3 * np.median(scene.l2a[1][other])
                return
    pytest.skip("no snowy cell found in the search window")


def test_clouds_raise_cover_and_brightness():
    clear = SyntheticWorld(3, (46.0, 8.0), 1, 3, thumbnail_size=64, cloud_prob=0.0)
    cloudy = SyntheticWorld(3, (46.0, 8.0), 1, 3, thumbnail_size=64, cloud_prob=1.0)
    for cell in clear.cells:
        a, b = clear.render(cell), cloudy.render(cell)
        assert a.scene.cloud_cover == 0.0 and not a.scene.cloud_mask.any()
        assert b.scene.cloud_cover > 1.0
        assert b.scene.l2a[0].mean() > a.scene.l2a[0].mean()


def test_missing_rates_honoured():
    w = SyntheticWorld(11, (40.0, -3.0), 20, 20, thumbnail_size=32, missing={"S1RTC": 0.3, "dem": 0.1})
    have = {m: np.mean([w.has(c, m) for c in w.cells]) for m in Modality}
    assert abs((1 - have[Modality.S1RTC]) - 0.3) < 0.07
    assert abs((1 - have[Modality.DEM]) - 0.1) < 0.05
    assert have[Modality.S2L2A] == 1.0 and have[Modality.S2L1C] == 1.0


def test_acquisition_formats(world):
    acq = world.acquisition(world.cells[0])
    tile = mgrs_tile(46.0, 8.0)
    assert tile == "32TMR"  # 46N 8E lies in Sentinel-2 granule T32TMR (UTM 32, band T)
    # obviously synthetic: the published format behind a SYNTH_ prefix
    assert acq.s2l2a_product_id.startswith(("SYNTH_S2A_MSIL2A_", "SYNTH_S2B_MSIL2A_"))
    assert acq.s2l1c_product_id.split("_")[3] == acq.s2l2a_product_id.split("_")[3]
    assert acq.s1_product_id.split("_")[:5] in (["SYNTH", "S1A", "IW", "GRDH", "1SDV"],
                                                ["SYNTH", "S1B", "IW", "GRDH", "1SDV"])
    gap = abs((acq.s1_time - acq.s2_time).total_seconds()) / 86400
    assert 0.5 < gap < 7.5
    assert dem_size_for(1068) == 356


def test_bad_settings_named():
    with pytest.raises(SyntheticWorldError, match="missing"):
        SyntheticWorld(1, missing={"S3": 0.1})
    with pytest.raises(SyntheticWorldError, match="cloud_prob"):
        SyntheticWorld(1, cloud_prob=2.0)
    with pytest.raises(SyntheticWorldError, match="origin"):
        SyntheticWorld(1, origin=(89.9, 0.0))


def test_write_world_reads_back(tmp_path):
    root = str(tmp_path / "world")
    summary = write_world(
        root, seed=5, origin=(46.0, 8.0), rows=2, cols=3, thumbnail_size=SIZE,
        missing={"S1RTC": 0.5}, cloud_prob=0.5, with_bands=True,
    )  # fmt: skip
    assert len(summary.cells) == 6
    reader = MajorTomReader(root)
    for m in Modality:
        lay = layout.layout(m)
        cells = summary.cells_with(m)
        meta = pq.read_table(summary.datasets[m.name].metadata_url)
        assert meta.schema.names == lay.metadata_schema.names
        assert sorted(meta.column("grid_cell").to_pylist()) == sorted(cells)
        part = pq.ParquetFile(summary.datasets[m.name].part_urls[0])
        assert part.metadata.num_row_groups == len(cells)  # one sample per row group, as published
        assert part.schema_arrow.names == lay.image_schema(True).names
        md = reader.read_metadata(m)
        assert sorted(md.frame["grid_cell"]) == sorted(cells)
    # a thumbnail read back through the codec has the size asked for
    s2 = pq.ParquetFile(summary.datasets["S2L2A"].part_urls[0]).read_row_group(0, columns=["thumbnail"])
    img = thumbnails.decode_thumbnail(s2.column("thumbnail")[0].as_py())
    assert img.shape == (SIZE, SIZE, 3)
    dem = pq.ParquetFile(summary.datasets["DEM"].part_urls[0]).read_row_group(0, columns=["thumbnail"])
    assert (
        thumbnails.decode_thumbnail(dem.column("thumbnail")[0].as_py()).shape[:2] == (dem_size_for(SIZE),) * 2
    )
    assert 0 < len(summary.cells_with("S1RTC")) < 6
