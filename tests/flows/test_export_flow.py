"""From a completion run to a training corpus, as a user runs it: ``copgen complete`` (a real Prefect flow
on Dask worker processes) -> ``copgen export`` (Major TOM layout; COG + STAC with the full dataset view)
-> ``copgen train --source`` on the export and on the cube itself, a few steps each."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import rasterio
from copgen.flows.cli import app
from copgen.flows.complete import run_complete
from copgen.flows.jobs import CompleteJob, OutputLayout
from copgen.modalities import Modality
from copgen.storage.majortom import grid
from copgen.storage.majortom.reader import MajorTomReader
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture(scope="module")
def completed(on_cluster, source, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("complete")
    summary = on_cluster(run_complete, job=CompleteJob(
        source=source, out=OutputLayout(str(out)), model=model,
        block_samples=4, run_seed=11))
    return out, summary


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_majortom_export_is_read_back_and_trained_on(completed, tiny_world, tiny_model, tmp_path):
    out, summary = completed
    root, _ = tiny_world
    corpus = tmp_path / "corpus"
    exported = _json(runner.invoke(app, ["export", str(out / "complete.zarr"), "--out", str(corpus),
                                         "--lossless", "--with-source", root]))
    world = MajorTomReader(root, thumbnail_sizes={m: None for m in Modality}).pair().pairs
    n = len(world)  # the completed cells plus the complete ones: the whole dataset
    assert sum(sum(v.values()) for v in exported["tiles"].values()) == 4 * n  # no tile absent
    pairs = MajorTomReader(str(corpus), thumbnail_sizes={m: None for m in Modality}).pair().pairs
    assert len(pairs) == n and pairs.complete.all()
    for m in Modality:
        meta = pd.read_parquet(corpus / m.dataset / "metadata.parquet").set_index("grid_cell")
        missing = set(world.grid_cell[~world[f"{m.name}_present"]])
        assert set(meta.index[meta.origin == "generated"]) == missing  # generated exactly where absent
        for cell in missing:
            prov = json.loads(meta.at[cell, "generator"])
            assert prov["run_id"] == summary["run_id"] and len(prov["network_sha256"]) == 64
            assert isinstance(prov["seed"], int)  # 63-bit seeds survive (no float round trip)
    # train on it through copgen train, half of the samples holding generated tiles
    _, vae = tiny_model
    result = runner.invoke(app, ["train", "--source", str(corpus), "--out", str(tmp_path / "model"),
                                 "--autoencoder", vae, "--sample-size", "32", "--network-steps", "2",
                                 "--batch-size", "4", "--generated-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "model" / "training.json").read_text())["network"]["data"]
    assert data["samples"] == 2 * summary["samples_done"]  # every generated one + as many real ones
    assert (tmp_path / "model" / "network.safetensors").exists()


def test_cog_export_with_the_source_is_the_whole_dataset(completed, tiny_world, tmp_path):
    out, summary = completed
    root, meta = tiny_world
    corpus = tmp_path / "cog"
    exported = _json(runner.invoke(app, ["export", str(out / "complete.zarr"), "--out", str(corpus),
                                         "--format", "cog", "--with-source", root]))
    pairs = MajorTomReader(root, thumbnail_sizes={m: None for m in Modality}).pair().pairs
    assert exported["items"] == len(pairs)  # completed cells + the complete ones the run left alone
    assert set(exported["collections"]) == {summary["run_id"], "real"}
    assert exported["stac_files_validated"] == 1 + 2 + len(pairs)
    cell = str(pairs[pairs.complete].grid_cell.iloc[0])
    items = [p.read_text() for p in (corpus / "real").rglob("*.json")]
    assert items and not any('"NaT"' in text for text in items)  # a DEM has no acquisition time: none
    with rasterio.open(corpus / "real" / f"{cell}_center_v0" / "S2L2A.tif") as ds:
        epsg = ds.crs.to_epsg()
        xmin, _, _, ymax = grid.sample_footprint(cell, epsg).bounds
        pix = 10680.0 / meta["thumbnail_sizes"]["S2L2A"]
        off = (meta["thumbnail_sizes"]["S2L2A"] - ds.width) // 2  # the centre crop, as the cube cuts it
        assert ds.bounds.left == pytest.approx(xmin + off * pix, abs=1e-3)
        assert ds.bounds.top == pytest.approx(ymax - off * pix, abs=1e-3)


def test_train_on_the_cube_itself(completed, tiny_model, tmp_path):
    out, _ = completed
    _, vae = tiny_model
    result = runner.invoke(app, ["train", "--source", str(out / "complete.zarr"),
                                 "--out", str(tmp_path / "m"), "--autoencoder", vae, "--sample-size", "32",
                                 "--network-steps", "2", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "network.safetensors").exists()


def test_generate_on_a_samples_tiles_gives_what_the_completion_gave(completed, tiny_model, tmp_path):
    """The same pixels and seed through ``copgen generate`` (files) and ``copgen complete`` (Major TOM)."""
    import numpy as np
    import xarray as xr
    from PIL import Image
    from tolerances import assert_uint8_close

    out, _ = completed
    net, vae = tiny_model
    ds = xr.open_zarr(out / "complete.zarr")
    origin = ds.origin.values
    i = int(np.flatnonzero((origin[:, 1] == 2).any(axis=1))[0])
    cell = str(ds.grid_cell.values[i])
    args, targets = [], []
    for j, m in enumerate(Modality):
        if origin[i, 1, j] == 1:  # real: its iteration-0 tile as a lossless PNG input
            path = tmp_path / f"{m.name}.png"
            Image.fromarray(ds[m.name].values[i, 0]).save(path)
            args += [f"--{m.name.lower()}", str(path)]
        elif origin[i, 1, j] == 2:
            targets.append(m)
    # the conftest model: steps 3, 2m, batch 4, seed 11 as the completed fixture
    result = runner.invoke(app, ["generate", *args, "--out", str(tmp_path / "gen"), "--weights", net,
                                 "--vae", vae, "--steps", "3", "--solver", "2m", "--batch-size", "4",
                                 "--seed", "11", "--grid-cell", cell, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for m in targets:
        got = np.asarray(Image.open(tmp_path / "gen" / f"{m.name}.png"))
        want = ds[m.name].values[i, 1]
        if m is Modality.DEM:  # written grey: the mean of the generated channels
            want = np.round(want.astype(np.float32).mean(axis=-1)).astype(np.uint8)
        assert_uint8_close(got, want, f"{cell} {m.name}")  # other worker process: last-bit rule
