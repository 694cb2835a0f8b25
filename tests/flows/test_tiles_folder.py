"""A folder of per-modality GeoTIFF tiles (TerraMesh-style) completed by the ``complete`` flow: real
TerraMesh S2L2A tiles (../shared/reference/real) in four UTM zones, the missing modalities generated, each
cube sample georeferenced by its own file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import rasterio
import xarray as xr
from copgen.flows.complete import run_complete
from copgen.flows.jobs import CompleteJob, OutputLayout, SourceSpec
from copgen.modalities import Modality
from copgen.storage.images import read_image
from copgen.storage.majortom.tiles_folder import TileFolderReader, is_tiles_folder

TIFS = ["282D_485L_3_3.tif", "38D_378R_2_3.tif", "433D_629L_3_1.tif", "637U_59R_1_3.tif"]


@pytest.fixture(scope="module")
def folder(real_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("terramesh")
    (root / "S2L2A").mkdir()
    for name in TIFS:
        shutil.copy(real_dir / name, root / "S2L2A" / name)
    (root / "S2L2A" / "broken_0_0.tif").write_bytes(b"II*\x00 not a tiff")
    return root


def test_the_folder_pairs_by_tile_id(folder):
    assert is_tiles_folder(str(folder))
    pairing = TileFolderReader(str(folder)).pair()
    assert list(pairing.pairs.grid_cell) == sorted(n[:-4] for n in TIFS)
    assert [b.grid_cell for b in pairing.bad] == ["broken_0_0"]  # named, not fatal
    assert pairing.pairs.S2L2A_present.all() and not pairing.pairs.complete.any()


def test_complete_fills_the_tiles_and_georeferences_them(on_cluster, folder, model, tmp_path):
    out = tmp_path / "out"
    summary = on_cluster(run_complete, job=CompleteJob(
        source=SourceSpec(root=str(folder)), out=OutputLayout(str(out)), model=model, block_samples=4,
        run_seed=3))
    assert summary["samples_done"] == 4
    # the unreadable tile is quarantined by name; the other tiles complete
    assert [(q["grid_cell"], q["file"].rsplit("/", 1)[-1]) for q in summary["quarantine"]] == [
        ("broken_0_0", "broken_0_0.tif")]
    ds = xr.open_zarr(out / "complete.zarr")
    size = ds.sizes["x"]
    off = (224 - size) // 2  # the centre crop of a 224 px tile
    for i, cell in enumerate(ds.grid_cell.values):
        path = folder / "S2L2A" / f"{cell}.tif"
        with rasterio.open(path) as src:
            x, _, _, y, _, _ = src.transform.to_gdal()
            assert int(ds.epsg.values[i]) == src.crs.to_epsg()
        # metres from the file's own tie point: exact up to float64 rounding of metre-scale sums
        np.testing.assert_allclose(ds.transform.values[i], (x + off * 10, 10, 0, y - off * 10, 0, -10),
                                   rtol=0, atol=1e-6)
        pixels = read_image(str(path), "S2L2A").pixels
        # the uint8 thumbnail cut unchanged into the cube: exact by construction
        np.testing.assert_array_equal(ds.S2L2A.values[i, 0], pixels[off:off + size, off:off + size])
        j = list(Modality).index(Modality.S1RTC)
        assert ds.origin.values[i, 1, j] == 2 and ds.S1RTC.values[i, 1].std() > 0
