"""The Zarr cube: schema, xarray access, block alignment, and real concurrent worker processes (local, S3)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

sys.path.insert(0, str(Path(__file__).parent))
import cube_worker  # noqa: E402
from copgen.modalities import Modality  # noqa: E402
from copgen.storage.cubes import (  # noqa: E402
    LICENCE,
    ORIGIN_CODES,
    BlockAlignmentError,
    BlockData,
    Cube,
    CubeError,
    CubeExistsError,
    CubeSchemaError,
    CubeSpec,
    WorkBlock,
)
from copgen.storage.ledger import Ledger  # noqa: E402

SPEC = CubeSpec(tile_size=16, iterations=2, latent_shape=(4, 2, 2), shard_samples=2, block_samples=4,
                provenance={"sampler": "dpm_solver++", "steps": 50, "network_sha256": "ab" * 32})


def _cells(n: int, offset: int = 0) -> tuple[list[str], list[str]]:
    return [f"{100 + i}U_{200 + i}R" for i in range(offset, offset + n)], [str(i % 16) for i in range(n)]


def _check_all_samples(cube: Cube, xds: xr.Dataset) -> None:
    """Every sample in the store equals what the worker computed for it. Exact: uint8/bool/float16 values
    come back as the bytes written, and ``synth_block`` recomputes them with the same code on this machine."""
    xds = xds.load()  # one read per variable, not one per block
    for block in cube.blocks():
        want = cube_worker.synth_block(cube, block)
        got = cube.read_block(block)
        sl = slice(block.start, block.stop)
        for m in cube.spec.modalities:
            np.testing.assert_array_equal(got[m.name], want.images[m], err_msg=f"{m.name} {block.id}")
            np.testing.assert_array_equal(xds[m.name].values[sl], want.images[m])
        np.testing.assert_array_equal(got["origin"], want.origin)
        np.testing.assert_array_equal(got["latents"], want.latents)
        np.testing.assert_array_equal(got["done"].astype(bool), want.done)
        np.testing.assert_array_equal(xds["done"].values[sl].astype(bool), want.done)


def _metadata(snapshot: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in snapshot.items() if k.endswith("zarr.json")}


def test_schema_attrs_and_xarray_open(tmp_path):
    url = str(tmp_path / "c.zarr")
    cube = Cube.create(url, SPEC)
    assert cube.n_samples == 0 and cube.blocks() == []
    cells, patches = _cells(10)
    blocks = cube.grow(cells, patches, centre_lat=np.linspace(-10, 10, 10), centre_lon=np.arange(10.0))
    assert [(b.start, b.stop) for b in blocks] == [(0, 4), (4, 8), (8, 10)]
    assert Cube.open(url).blocks() == blocks

    ds = xr.open_zarr(url)
    assert ds.sizes["sample"] == 10 and ds.sizes["iteration"] == SPEC.iterations
    assert list(ds["grid_cell"].values) == cells and list(ds["patch"].values) == patches
    np.testing.assert_allclose(ds["centre_lat"].values, np.linspace(-10, 10, 10))
    assert list(ds["modality"].values) == [m.name for m in Modality]
    for m in Modality:
        assert ds[m.name].dims == ("sample", "iteration", "y", "x", "band")
        assert ds[m.name].dtype == np.uint8
        assert ds[m.name].encoding["chunks"] == (1, 1, 16, 16, 3)  # inner chunk = one tile
        assert ds[m.name].encoding["shards"] == (2, 2, 16, 16, 3)
    assert ds["latents"].dims == ("sample", "iteration", "modality", "c", "h", "w")
    assert ds["latents"].dtype == np.float16
    assert ds["origin"].dtype == np.uint8  # not turned into float by fill-value masking
    assert list(ds["origin"].attrs["flag_values"]) == list(ORIGIN_CODES.values())
    assert ds["origin"].attrs["flag_meanings"].split() == list(ORIGIN_CODES)
    assert ds.attrs["license"] == LICENCE == "CC-BY-SA-4.0"
    assert "Copernicus Sentinel" in ds.attrs["licence_note"]
    assert ds.attrs["synthetic"] is True
    assert ds.attrs["copgen_provenance"]["network_sha256"] == "ab" * 32
    assert ds.attrs["Conventions"].startswith("CF-")
    assert not ds["done"].values.any()

    # incremental: a second batch gets its own blocks, starting on a shard boundary
    more = cube.grow(*_cells(6, offset=10))
    assert [(b.start, b.stop) for b in more] == [(10, 14), (14, 16)]
    assert xr.open_zarr(url).sizes["sample"] == 16  # consolidated metadata was refreshed
    assert list(xr.open_zarr(url)["grid_cell"].values[:10]) == cells  # old coordinates intact


def test_write_refuses_unaligned_regions_and_bad_data(tmp_path):
    url = str(tmp_path / "c.zarr")
    cube = Cube.create(url, SPEC)
    cube.grow(*_cells(9))  # blocks [0,4) [4,8) [8,9): length 9 is not a multiple of shard_samples=2
    good = cube_worker.synth_block(cube, WorkBlock(0, 4))
    for bad in (WorkBlock(1, 5), WorkBlock(0, 2), WorkBlock(0, 8), WorkBlock(8, 10)):
        msg = rf"region \[{bad.start}, {bad.stop}\) is not a work block"
        with pytest.raises(BlockAlignmentError, match=msg):
            cube.write_block(bad, good)
    wrong = BlockData(keys=good.keys, images={"S2L2A": good.images[Modality.S2L2A][..., :2]},
                      origin=good.origin,
                      latents=good.latents)
    msg = r"block 0000000000-0000000004 .*S2L2A must be uint8 \(4, 2, 16, 16, 3\)"
    with pytest.raises(CubeSchemaError, match=msg):
        cube.write_block(WorkBlock(0, 4), wrong)
    with pytest.raises(CubeSchemaError, match="latents"):
        cube.write_block(WorkBlock(0, 4), BlockData(keys=good.keys, images=good.images, origin=good.origin))
    with pytest.raises(CubeSchemaError, match="origin codes"):
        bad_origin = BlockData(keys=good.keys, images=good.images, origin=good.origin + 3,
                               latents=good.latents)
        cube.write_block(WorkBlock(0, 4), bad_origin)
    assert not cube.done_mask().any()  # nothing was written by the refused calls
    with pytest.raises(CubeSchemaError, match="multiple of shard_samples"):
        CubeSpec(shard_samples=4, block_samples=6)
    with pytest.raises(CubeExistsError, match="exists with another schema"):
        Cube.create(url, CubeSpec(tile_size=32))
    assert Cube.create(url, SPEC).n_samples == 9  # same schema: reopened for a resume, unchanged


def test_growing_after_a_ragged_shard_pads_to_the_next_shard(tmp_path):
    """Shards never span batches: after 9 samples in shards of 2 the next batch starts at 10; sample 9
    is padding (in no batch or block, never pending). A layout-only difference reopens the cube."""
    url = str(tmp_path / "c.zarr")
    cube = Cube.create(url, SPEC)
    cube.grow(*_cells(9))
    more = cube.grow(*_cells(3, offset=9))
    assert [(b.start, b.stop) for b in more] == [(10, 13)]
    assert cube.batches == [(0, 9), (10, 13)] and cube.n_samples == 13
    assert list(np.flatnonzero(~cube.batch_mask())) == [9]
    assert all(9 not in range(b.start, b.stop) for b in cube.blocks())
    cube.write_block(more[0], cube_worker.synth_block(cube, more[0]))
    assert list(Ledger(url).pending_samples(cube)) == list(range(9))  # blocks of the first batch only
    relaid = dataclasses.replace(SPEC, shard_samples=1, compress_tiles=True)
    assert Cube.create(url, relaid).spec == SPEC  # same content, other layout: the existing cube
    assert CubeSpec(block_samples=8).shard_samples == 8  # default: one shard per block


def test_rewriting_a_block_writes_identical_bytes(tmp_path):
    url = str(tmp_path / "c.zarr")
    cube = Cube.create(url, SPEC)
    block = cube.grow(*_cells(4))[0]
    data = cube_worker.synth_block(cube, block)
    digests = cube.write_block(block, data)
    first = cube_worker.snapshot(url)
    assert cube.write_block(block, data) == digests == cube.block_digest(block)
    assert cube_worker.snapshot(url) == first
    # uint8 bytes: exact
    np.testing.assert_array_equal(cube.read_tile(3, 1, "S1RTC"), data.images[Modality.S1RTC][3, 1])


def _run_workers(cube_url: str, tables_url: str, so: dict | None, n_workers: int) -> None:
    cube = Cube.open(cube_url, so)
    blocks = cube.blocks()
    procs = [cube_worker.spawn(cube_url, tables_url, "run-1", blocks[i::n_workers], so)
             for i in range(n_workers)]
    written = sorted(b for p in procs for b in cube_worker.finish(p)[1])
    assert written == sorted(b.id for b in blocks)


def test_concurrent_worker_processes_local(tmp_path):
    url = str(tmp_path / "c.zarr")
    cube = Cube.create(url, SPEC)
    cube.grow(*_cells(22))  # 6 blocks, the last one partial
    before = _metadata(cube_worker.snapshot(url))
    _run_workers(url, str(tmp_path / "tables"), None, n_workers=3)
    assert _metadata(cube_worker.snapshot(url)) == before  # workers never rewrote metadata
    cube = Cube.open(url)
    _check_all_samples(cube, xr.open_zarr(url))
    assert Ledger(url).pending_blocks(cube) == []


def test_concurrent_worker_processes_s3(s3_server):
    so = s3_server.storage_options
    url = f"s3://{s3_server.new_bucket()}/cubes/c.zarr"
    cube = Cube.create(url, SPEC, so)
    cube.grow(*_cells(10))  # 3 blocks, one partial; moto is slow, so this test stays small
    before = _metadata(cube_worker.snapshot(url, so))
    _run_workers(url, url.replace("c.zarr", "tables"), so, n_workers=2)
    assert _metadata(cube_worker.snapshot(url, so)) == before
    cube = Cube.open(url, so)
    # chunks=None: plain lazy arrays, each read as one concurrent zarr call (not a dask task per tile)
    _check_all_samples(cube, xr.open_zarr(url, storage_options=so, chunks=None))
    assert Ledger(url, so).pending_blocks(cube) == []


def test_write_refuses_a_block_whose_keys_are_not_the_cubes_samples(tmp_path):
    """Like a chunk key against its template: a block computed for other samples never lands here."""
    from copgen.records import SampleKey

    cube = Cube.create(str(tmp_path / "c.zarr"), SPEC)
    (block, _) = cube.grow(*_cells(8))
    good = cube_worker.synth_block(cube, block)
    assert good.keys[1] == SampleKey("101U_201R", "1", 0)
    swapped = [good.keys[1], good.keys[0], *good.keys[2:]]
    other_variant = [*good.keys[:3], SampleKey(good.keys[3].grid_cell, good.keys[3].patch, 1)]
    cases = ((swapped, "sample 0 is"), (other_variant, "sample 3 is"), (good.keys[:3], "3 sample keys"))
    for keys, where in cases:
        data = BlockData(keys=keys, images=good.images, origin=good.origin, latents=good.latents,
                         done=good.done)
        with pytest.raises(CubeSchemaError, match=where):
            cube.write_block(block, data)
    assert not cube.done_mask().any()  # nothing was written by the refused calls
    cube.write_block(block, good)
    assert cube.done_mask()[:4].tolist() == list(good.done)


def test_the_read_view_reads_what_was_written_and_never_writes(tmp_path):
    url = str(tmp_path / "c.zarr")
    cube = Cube.create(url, SPEC)
    (block, _) = cube.grow(*_cells(8))
    data = cube_worker.synth_block(cube, block)
    cube.write_block(block, data)
    view = Cube.open(url, read_only=True)
    assert list(view.grid_cells()[:4]) == [k.grid_cell for k in data.keys]
    # uint8 codes and tiles read back: exact by construction
    np.testing.assert_array_equal(view.origins()[:4], data.origin)  # integer codes: exact
    # uint8 tiles read back: exact
    np.testing.assert_array_equal(view.tiles("S2L2A", [1, 3], 1), data.images[Modality.S2L2A][[1, 3], 1])
    assert view.dataset().sizes["sample"] == 8 and view.attrs["license"] == LICENCE
    with pytest.raises(CubeError, match="opened read-only"):
        view.write_block(block, data)
