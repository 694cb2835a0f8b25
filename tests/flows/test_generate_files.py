"""``copgen generate`` on the official sample images and real GeoTIFFs (../shared/reference/real): the
plumbing — shapes, CRS, transforms, tiling, provenance — with the tiny model (32 px tiles), run as a user
runs it, through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from copgen.flows.cli import app
from copgen.flows.generate_files import tile_seed
from copgen.storage.images import read_image, tile_grid
from PIL import Image
from typer.testing import CliRunner

runner = CliRunner()
WEBP = {"DEM": "dem.webp", "S1RTC": "s1rtc.webp", "S2L1C": "s2l1c.webp", "S2L2A": "s2l2a.webp"}
FAST = ["--steps", "2", "--solver", "2m", "--batch-size", "16", "--device", "cpu"]


def _run(args) -> dict:
    result = runner.invoke(app, ["generate", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


@pytest.mark.parametrize("given", sorted(WEBP))
def test_each_official_sample_image_gives_the_three_others(given, real_dir, tiny_model, tmp_path):
    net, vae = tiny_model
    out = tmp_path / "gen"
    summary = _run([f"--{given.lower()}", str(real_dir / WEBP[given]), "--out", str(out), "--weights", net,
                    "--vae", vae, *FAST])
    want = sorted(set(WEBP) - {given})
    assert sorted(summary["outputs"]) == want and summary["crs"] is None  # a WebP has no CRS
    for m in want:
        img = np.asarray(Image.open(out / f"{m}.png"))
        assert img.shape[:2] == (256, 256)  # 8 x 8 tiles of 32 px stitched back
        assert img.ndim == (2 if m == "DEM" else 3)
    prov = json.loads((out / "provenance.json").read_text())
    assert len(prov["tiles"]) == 64 and len({t["seed"] for t in prov["tiles"]}) == 64
    assert prov["tiles"][9]["seed"] == tile_seed(0, "image", "r1c1")
    assert prov["inputs"][given]["sha256"] and len(prov["network_sha256"]) == 64


def test_real_geotiff_outputs_keep_its_crs_and_transform(real_dir, tiny_model, tmp_path):
    net, vae = tiny_model
    tif = real_dir / "637U_59R_1_3.tif"  # 224 px, 12 int16 S2L2A bands, EPSG:32632
    out = tmp_path / "gen"
    summary = _run(["--s2l2a", str(tif), "--target", "S1RTC,DEM", "--out", str(out), "--weights", net,
                    "--vae", vae, *FAST])
    assert summary["crs"] == "EPSG:32632"
    with rasterio.open(tif) as src:
        want_transform, want_bounds = src.transform, src.bounds
    for m, bands in (("S1RTC", 3), ("DEM", 1)):
        with rasterio.open(out / f"{m}.tif") as ds:
            assert ds.crs.to_epsg() == 32632 and (ds.width, ds.height) == (224, 224) and ds.count == bands
            # copied from the input, not recomputed: the same float64 values
            assert ds.transform.almost_equals(want_transform, precision=1e-9)
            assert tuple(ds.bounds) == pytest.approx(tuple(want_bounds), abs=1e-6)
    # the input became the published S2 thumbnail of its bands
    img = read_image(str(tif), "S2L2A")
    assert img.kind == "bands-geotiff" and img.pixels.shape == (224, 224, 3) and img.pixels.std() > 5


def test_mixed_inputs_must_share_a_grid_and_size(real_dir, tiny_model, tmp_path):
    net, vae = tiny_model
    result = runner.invoke(app, ["generate", "--s2l2a", str(real_dir / "637U_59R_1_3.tif"), "--dem",
                                 str(real_dir / "dem.webp"), "--out", str(tmp_path), "--weights", net,
                                 "--vae", vae, *FAST])
    assert result.exit_code == 2 and "differ in size" in result.output


def test_tile_grid_covers_with_edge_aligned_overlap_and_pads_small_images():
    tiles, padded = tile_grid(70, 64, 32)
    assert padded == (70, 64) and [(t.row, t.col) for t in tiles] == [
        (0, 0), (0, 32), (32, 0), (32, 32), (38, 0), (38, 32)]
    tiles, padded = tile_grid(24, 24, 32)
    assert padded == (32, 32) and [t.label for t in tiles] == ["center"]


def test_earlier_outputs_are_never_overwritten(real_dir, tiny_model, tmp_path):
    net, vae = tiny_model
    (tmp_path / "provenance.json").write_text("{}")
    result = runner.invoke(app, ["generate", "--dem", str(real_dir / "dem.webp"), "--out", str(tmp_path),
                                 "--weights", net, "--vae", vae, *FAST])
    assert result.exit_code == 2 and "provenance.json" in result.output  # (rich wraps the line)
    assert (tmp_path / "provenance.json").read_text() == "{}"
