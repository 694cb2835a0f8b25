"""Exports of a cube, opened with the libraries a user opens them with: rasterio for the COGs, pystac's
validation (offline, vendored extension schemas) for the STAC catalog, our Major TOM reader for the
parquet layout. The cube is written through the real driver/worker API (grow with a plan, write_block,
provenance table parts), with real cells in UTM zone 32N."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from copgen.flows.plan import grow_with_plan
from copgen.modalities import ALL, Modality
from copgen.storage import plans, tables
from copgen.storage.cubes import BlockData, Cube, CubeSpec
from copgen.storage.export import Selection, iter_samples
from copgen.storage.export_majortom import write_majortom
from copgen.storage.ledger import Ledger, QuarantineRecord
from copgen.storage.majortom import grid
from copgen.storage.majortom.reader import MajorTomReader
from copgen.storage.stac import OfflineValidator, validate_catalog, write_cog_stac

CELLS = ["637U_59R", "637U_60R", "638U_59R", "638U_60R"]
RUN = "complete-20260101T000000-abcdef"
S = 32
R, G, A = 1, 2, 0
# per sample, origin at iteration 1 in model order DEM, S1RTC, S2L1C, S2L2A; sample 1 is quarantined
ORIGIN = np.array([[G, R, G, R], [G, G, G, R], [R, R, R, R], [G, G, G, R]], dtype=np.uint8)
TOL_M = 1e-3  # float64 sums of metre-scale values


@pytest.fixture(scope="module")
def cube_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    url = str(out / "complete.zarr")
    cube = Cube.create(url, CubeSpec(tile_size=S, iterations=2, block_samples=4))
    rows = pd.DataFrame({"grid_cell": CELLS, "patch": "center", "variant": 0,
                         "centre_lat": [grid.cell_centre(c)[0] for c in CELLS],
                         "centre_lon": [grid.cell_centre(c)[1] for c in CELLS], "targets": ""})
    for j, m in enumerate(ALL):
        real = ORIGIN[:, j] == R
        rows[f"{m.name}_present"] = real
        rows[f"{m.name}_file"] = [f"Core-{m.name}/images/part_00000.parquet" if r else None for r in real]
        rows[f"{m.name}_row"] = [i if r else -1 for i, r in enumerate(real)]
        rows[f"{m.name}_product_id"] = [f"{m.name}-P{i}" if r else None for i, r in enumerate(real)]
        rows[f"{m.name}_timestamp"] = [pd.Timestamp(f"2021-06-0{i + 1} 10:30", tz="UTC") if r else pd.NaT
                                       for i, r in enumerate(real)]
        rows[f"{m.name}_crs"] = ["EPSG:32632" if r else None for r in real]
        rows[f"{m.name}_cloud_cover"] = [2.5 if r else np.nan for r in real]
    (block,) = grow_with_plan(cube, plans.from_frame(rows), None)
    rng = np.random.default_rng(0)
    images = {m: rng.integers(0, 256, (4, 2, S, S, 3), dtype=np.uint8) for m in ALL}
    images[Modality.DEM][..., 1] = images[Modality.DEM][..., 2] = images[Modality.DEM][..., 0]  # grey
    origin = np.stack([np.where(ORIGIN == G, A, ORIGIN), ORIGIN], axis=1)
    cube.write_block(block, BlockData(keys=cube.sample_keys(), images=images, origin=origin,
                                      done=np.array([1, 0, 1, 1], bool)))
    Ledger(url).quarantine(QuarantineRecord(CELLS[1], "center", "S2L2A", "x.parquet", "corrupt"))
    prov = [{"grid_cell": CELLS[i], "patch": "center", "sample": i, "iteration": 1, "modality": m.name,
             "origin": "generated", "conditioned_on": ["S2L2A"], "seed": 1000 + i, "sampler": "2m",
             "steps": 3, "network_sha256": "ab" * 32, "autoencoder_sha256": "cd" * 32, "synthetic": True}
            for i in range(4) for j, m in enumerate(ALL) if ORIGIN[i, j] == G]
    tables.write_provenance(str(out / "tables" / "provenance"), RUN, block.id, prov)
    with cube.driver_group() as g:
        g.attrs["copgen_runs"] = {RUN: {"network": "bundled/network.safetensors"}}
    return out, url, images


def test_samples_exclude_quarantine_and_carry_provenance(cube_dir):
    _, url, images = cube_dir
    samples = list(iter_samples(url))
    assert [s.grid_cell for s in samples] == [CELLS[0], CELLS[2], CELLS[3]]
    s0 = samples[0]
    assert s0.run_id == RUN and samples[1].run_id is None  # sample 2 is all real
    assert s0.tiles[Modality.DEM].origin == "generated"
    assert s0.tiles[Modality.DEM].provenance["seed"] == 1000
    assert s0.tiles[Modality.S2L2A].provenance["product_id"] == "S2L2A-P0"
    np.testing.assert_array_equal(s0.tiles[Modality.S1RTC].image, images[Modality.S1RTC][0, 1])  # uint8 copy
    only_gen = list(iter_samples(url, Selection(origins=("generated",), modalities=(Modality.DEM,))))
    assert [s.grid_cell for s in only_gen] == [CELLS[0], CELLS[3]]
    assert list(iter_samples(url, Selection(run_id="complete-other"))) == []


def test_cog_export_opens_in_rasterio_at_the_right_place_and_stac_validates_offline(cube_dir, tmp_path):
    import pystac
    import rasterio

    _, url, images = cube_dir
    out = tmp_path / "cog"
    summary = write_cog_stac(iter_samples(url), str(out))
    assert summary["collections"] == sorted([RUN, "real"]) and summary["items"] == 3
    assert validate_catalog(str(out)) == 1 + 2 + 3  # catalog, collections, items

    fp = grid.sample_footprint(CELLS[0], 32632)
    with rasterio.open(out / RUN / f"{CELLS[0]}_center_v0" / "S2L2A.tif") as ds:
        assert ds.crs.to_epsg() == 32632
        np.testing.assert_allclose(tuple(ds.bounds), fp.patch_bounds_utm("center"), rtol=0, atol=TOL_M)
        assert ds.res == pytest.approx((256 * 10.0 / S, 256 * 10.0 / S))  # a 256 px window cut to 32 px
        assert ds.tags()["copgen_origin"] == "real"
        # lossless deflate of uint8 pixels: exact by construction
        np.testing.assert_array_equal(np.moveaxis(ds.read(), 0, -1), images[Modality.S2L2A][0, 1])  # uint8
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    with rasterio.open(out / RUN / f"{CELLS[0]}_center_v0" / "DEM.tif") as ds:
        assert ds.count == 1

    catalog = pystac.Catalog.from_file(str(out / "catalog.json"))
    item = next(i for i in catalog.get_items(recursive=True) if i.id == f"{CELLS[0]}_center_v0")
    assert item.properties["proj:code"] == "EPSG:32632"
    assert item.assets["DEM"].extra_fields["copgen:origin"] == "generated"
    assert item.assets["DEM"].extra_fields["copgen:network_sha256"] == "ab" * 32
    assert item.get_collection().license == "CC-BY-SA-4.0"

    # the validator does validate: a broken proj:code fails against the vendored extension schema
    path = out / RUN / f"{CELLS[0]}_center_v0" / f"{CELLS[0]}_center_v0.json"
    d = json.loads(path.read_text())
    d["properties"]["proj:code"] = 32632
    with pytest.raises(pystac.errors.STACValidationError):
        pystac.validation.validate_dict(d, validator=OfflineValidator())


def test_majortom_export_reads_back_with_origins(cube_dir, tmp_path):
    _, url, images = cube_dir
    out = tmp_path / "mt"
    summary = write_majortom(iter_samples(url), str(out), thumbnail_format="png")
    assert summary["tiles"]["DEM"] == {"generated": 2, "real": 1}
    reader = MajorTomReader(str(out), thumbnail_sizes={m: None for m in Modality})
    pairs = reader.pair().pairs
    assert sorted(pairs.grid_cell) == sorted([CELLS[0], CELLS[2], CELLS[3]]) and pairs.complete.all()
    meta = pd.read_parquet(out / "Core-DEM" / "metadata.parquet").set_index("grid_cell")
    assert meta.loc[CELLS[0], "origin"] == "generated" and meta.loc[CELLS[2], "origin"] == "real"
    assert json.loads(meta.loc[CELLS[0], "generator"])["seed"] == 1000
    assert meta.loc[CELLS[0], "crs"] == "EPSG:32632"
    refs = reader.refs(pairs[pairs.grid_cell == CELLS[0]].reset_index(drop=True), Modality.S1RTC)
    thumb = reader.read_sample(refs[0]).thumbnail
    np.testing.assert_array_equal(thumb, images[Modality.S1RTC][0, 1])  # PNG is lossless


# ---- the training dataset over the same cube and over its Major TOM export ----------------------------


def test_dataset_over_the_cube_mixes_and_shards_across_workers(cube_dir):
    import torch
    from copgen.storage.dataset import CorpusDataset

    _, url, images = cube_dir
    ds = CorpusDataset(url, seed=1)
    # quarantined sample 1 left out; samples 0 and 3 have generated tiles, sample 2 is all real
    assert sorted(ds.index.grid_cell) == sorted([CELLS[0], CELLS[2], CELLS[3]])
    assert sorted(CorpusDataset(url, generated_fraction=0.0).index.grid_cell) == [CELLS[2]]
    assert sorted(CorpusDataset(url, generated_fraction=1.0).index.grid_cell) == [CELLS[0], CELLS[3]]
    half = CorpusDataset(url, generated_fraction=0.5, seed=3).index
    assert len(half) == 2 and half.generated.sum() == 1
    # a modality subset where sample 3 is fully real except S1RTC... choose S2L2A only: all real
    assert not CorpusDataset(url, modalities=["S2L2A"]).index.generated.any()

    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    seen = []
    for batch in loader:
        assert batch["images"].dtype == torch.uint8 and batch["images"].shape[1:] == (4, S, S, 3)
        seen += list(batch["grid_cell"])
        for k, cell in enumerate(batch["grid_cell"]):
            i = CELLS.index(cell)
            # uint8 tiles read back unchanged: exact by construction
            assert torch.equal(batch["images"][k, 3], torch.from_numpy(images[Modality.S2L2A][i, 1]))  # uint8
            assert json.loads(batch["provenance"][k])["S2L2A_product_id"] == f"S2L2A-P{i}"
    assert sorted(seen) == sorted(ds.index.grid_cell)  # two workers: every sample exactly once
    shards = [set(it["grid_cell"] for it in CorpusDataset(url, shard=(k, 2))) for k in range(2)]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(ds.index.grid_cell)


def test_dataset_over_a_majortom_export_keeps_origins(cube_dir, tmp_path):
    from copgen.storage.dataset import CorpusDataset, corpus_kind

    _, url, images = cube_dir
    out = tmp_path / "mt"
    write_majortom(iter_samples(url), str(out), thumbnail_format="png")
    assert corpus_kind(str(out)) == "export" and corpus_kind(url) == "cube"
    ds = CorpusDataset(str(out), generated_fraction=1.0, sample_size=16)
    items = list(ds)
    assert sorted(it["grid_cell"] for it in items) == [CELLS[0], CELLS[3]]
    it = items[0]
    assert it["images"].shape == (4, 16, 16, 3) and "generated" in it["origin"]
    assert json.loads(it["provenance"])["DEM_generator"]["network_sha256"] == "ab" * 32
    assert it["epsg"] == 32632


def test_export_from_and_to_s3(cube_dir, s3_server):
    """A cube on an S3-compatible server (moto, real HTTP) exported to S3 in both formats."""
    out, _, images = cube_dir
    fs = s3_server.filesystem()
    bucket = s3_server.new_bucket()
    fs.put(str(out), f"{bucket}/run", recursive=True)
    so = s3_server.storage_options
    url = f"s3://{bucket}/run/complete.zarr"
    samples = list(iter_samples(url, storage_options=so))
    assert [s.grid_cell for s in samples] == [CELLS[0], CELLS[2], CELLS[3]]
    assert samples[0].tiles[Modality.DEM].provenance["seed"] == 1000  # the table beside the cube, on S3
    summary = write_cog_stac(iter(samples), f"s3://{bucket}/cog", storage_options=so)
    assert summary["items"] == 3 and validate_catalog(f"s3://{bucket}/cog", so) == 6
    write_majortom(iter(samples), f"s3://{bucket}/mt", storage_options=so, thumbnail_format="png")
    reader = MajorTomReader(f"s3://{bucket}/mt", storage_options=so,
                            thumbnail_sizes={m: None for m in Modality})
    assert len(reader.pair().pairs) == 3


def test_cog_export_refuses_a_folder_that_is_not_empty(cube_dir, tmp_path):
    from copgen.storage.stac import StacExportError

    _, url, _ = cube_dir
    (tmp_path / "someone_elses.txt").write_text("keep")
    with pytest.raises(StacExportError, match="not empty"):
        write_cog_stac(iter_samples(url), str(tmp_path))
    assert (tmp_path / "someone_elses.txt").read_text() == "keep"
