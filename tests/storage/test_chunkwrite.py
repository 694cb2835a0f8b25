"""The block writer (storage/chunkwrite.py) stores exactly the objects zarr-python stores for the same values.

Compared byte for byte: both encodings are deterministic functions of integer/float16 input bytes (no
float arithmetic), so equality holds by construction. Covered: sharded tiles with and without zstd,
all-zero tiles (left out of the shard), a shard whose tiles are all zero (no object at all), float16
latents, unsharded origin/done chunks (a ``done`` chunk of zeros has no object), a ragged last block,
and a rewrite over objects written by zarr-python (a crash mid-block, then the resumed write).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from copgen.storage import chunkwrite
from copgen.storage.cubes import BlockData, Cube, CubeSpec


def _objects(url: str) -> dict[str, bytes]:
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _block_data(cube: Cube, block, rng) -> BlockData:
    spec, n = cube.spec, block.size
    it, t, nm = spec.iterations, spec.tile_size, len(spec.modalities)
    images = {}
    for j, m in enumerate(spec.modalities):
        a = rng.integers(0, 256, (n, it, t, t, spec.bands), dtype=np.uint8)
        a[:, 0] = 0 if j % 2 else a[:, 0]  # absent inputs: all-zero tiles
        if n > 1:
            a[1] = 0  # one sample with every tile zero: its shard is empty
        images[m] = a
    latents = None
    if spec.latent_shape is not None:
        latents = rng.standard_normal((n, it, nm, *spec.latent_shape)).astype(np.float16)
        latents[:, 0, 0] = 0  # an empty inner chunk of a latent shard
    origin = rng.integers(0, 3, (n, it, nm), dtype=np.uint8)
    done = np.arange(n) % 3 != 2  # some samples quarantined: done = 0 chunks
    return BlockData(keys=cube.sample_keys(block.start, block.stop), images=images, origin=origin,
                     latents=latents, done=done)


def _via_zarr(cube: Cube, block, data: BlockData) -> None:
    """What Cube.write_block used to do: zarr-python's region assignment, array by array."""
    g = cube.group
    for m in cube.spec.modalities:
        g[m.name][block.start:block.stop] = data.images[m]
    if data.latents is not None:
        g["latents"][block.start:block.stop] = data.latents
    g["origin"][block.start:block.stop] = data.origin
    g["done"][block.start:block.stop] = np.asarray(data.done, dtype=np.uint8)


@pytest.mark.parametrize("spec", [
    CubeSpec(tile_size=8, iterations=2, latent_shape=(4, 2, 2), shard_samples=2, block_samples=4),
    CubeSpec(tile_size=8, iterations=3, shard_samples=1, block_samples=3, compress_tiles=True),
], ids=["raw-tiles-latents", "zstd-tiles"])
def test_block_writer_stores_what_zarr_stores(tmp_path, spec):
    cubes = []
    for name in ("fast", "zarr"):
        cube = Cube.create(str(tmp_path / f"{name}.zarr"), spec)
        cube.grow([f"{i}U_{i}R" for i in range(10)], ["center"] * 10)  # blocks end ragged: [8, 10) / [9, 10)
        cubes.append(Cube.open(cube.url))
    fast, slow = cubes
    chunkwrite._Target(fast.group.store, fast.url, None)  # the fast path applies (no fallback) ...
    written = [m.name for m in spec.modalities] + ["origin", "done"] + ["latents"] * bool(spec.latent_shape)
    for name in written:
        chunkwrite._Encoder.of(fast.group[name])  # ... to every array a block writes
    for block in fast.blocks():
        data = _block_data(fast, block, np.random.default_rng(block.start))
        fast.write_block(block, data)
        _via_zarr(slow, block, data)
    got, want = _objects(fast.url), _objects(slow.url)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    # zero tiles/samples really were left out (and read back as zeros)
    first = spec.modalities[0].name
    assert f"{first}/c/1/0/0/0/0" not in got or spec.shard_samples > 1
    assert np.all(fast.read_block(fast.blocks()[0])[first][1] == 0)


def test_rewrite_over_objects_zarr_wrote_and_readback(tmp_path):
    """A block half-written by zarr-python (different values), then written by the block writer: the
    store ends equal to a clean write, and every array reads back as written (uint8/float16: exact)."""
    spec = CubeSpec(tile_size=8, iterations=2, latent_shape=(4, 2, 2), shard_samples=2, block_samples=4)
    clean = Cube.create(str(tmp_path / "clean.zarr"), spec)
    clean.grow([f"{i}U_{i}R" for i in range(8)], ["center"] * 8)
    dirty = Cube.create(str(tmp_path / "dirty.zarr"), spec)
    dirty.grow([f"{i}U_{i}R" for i in range(8)], ["center"] * 8)
    clean, dirty = Cube.open(clean.url), Cube.open(dirty.url)
    block = clean.blocks()[1]
    data = _block_data(clean, block, np.random.default_rng(7))
    other = _block_data(clean, block, np.random.default_rng(8))
    other.images = {m: np.full_like(a, 255) for m, a in other.images.items()}  # no empty tile anywhere
    _via_zarr(dirty, block, other)
    digests = dirty.write_block(block, data)
    clean.write_block(block, data)
    assert _objects(dirty.url) == _objects(clean.url)
    back = dirty.read_block(block)
    for m in spec.modalities:
        assert np.array_equal(back[m.name], data.images[m])
    assert np.array_equal(back["latents"].view(np.uint16), data.latents.view(np.uint16))  # bit pattern
    assert np.array_equal(back["done"], data.done.astype(np.uint8))
    assert digests == dirty.block_digest(block)


def test_arrays_outside_the_format_fall_back_to_zarr(tmp_path):
    """An index at the start of the shard is not reproduced: written through zarr-python, reads back."""
    from zarr.codecs import BytesCodec, ShardingCodec

    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    codec = ShardingCodec(chunk_shape=(1, 4), codecs=[BytesCodec()], index_location="start")
    arr = g.create_array("a", shape=(4, 4), dtype="uint8", chunks=(2, 4), serializer=codec, compressors=None)
    with pytest.raises(chunkwrite.Unsupported):
        chunkwrite._Encoder.of(arr)
    values = np.arange(16, dtype=np.uint8).reshape(4, 4)
    chunkwrite.write_region(g, str(tmp_path / "g.zarr"), None, 0, {"a": values})
    assert np.array_equal(zarr.open_group(str(tmp_path / "g.zarr"), mode="r")["a"][:], values)
