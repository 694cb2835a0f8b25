"""Cube write throughput vs plain files on the same disk, and the read time of one tile.

    python benchmarks/cube_write.py [--samples 1280] [--tile 256] [--block 32] [--shard 0] [--dir DIR]

Writes ~1 GB (1280 samples x 4 modalities x 256x256x3 uint8, one iteration) with ``Cube.write_block``
(the production worker path: storage/chunkwrite.py, whole objects, concurrent), and the same bytes as one
plain file per (sample, modality), block by block in alternating order (cube first on even blocks,
plain first on odd ones) so both see the same machine load and page-cache writeback; prints MB/s and
their ratio (wall and process CPU time) and the tiles' size on disk. Also times the same blocks
through ``xarray.Dataset.to_zarr(region=...)`` on a subset (the alternative writer), and the mean read
time of one (sample, iteration) tile from a fresh handle. Data: a smooth field plus noise, so it
compresses like a thumbnail rather than like random bytes. Both writers land in the page cache (no
fsync), so this measures encoding and filesystem cost. Everything is written under a temp dir and
removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from copgen.modalities import ALL  # noqa: E402
from copgen.records import SampleKey  # noqa: E402
from copgen.storage.cubes import BlockData, Cube, CubeSpec, WorkBlock  # noqa: E402

CPU = {"cube": 0.0, "plain": 0.0}  # process CPU seconds (all threads): less sensitive to a busy machine


def make_block(block: WorkBlock, spec: CubeSpec) -> BlockData:
    n, t = block.size, spec.tile_size
    yy, xx = np.mgrid[0:t, 0:t]
    images = {}
    for m in spec.modalities:
        rng = np.random.default_rng([block.start, int(m)])
        offset = rng.integers(0, 64, (n, 1, 1, 3))
        base = yy[None, :, :, None] + xx[None, :, :, None] * (int(m) + 1) + offset
        noise = rng.integers(0, 24, (n, t, t, 3))
        images[m] = ((base + noise) % 256).astype(np.uint8)[:, None]  # (n, 1, t, t, 3)
    origin = np.full((n, 1, len(spec.modalities)), 2, dtype=np.uint8)
    # the samples bench_cube grew: cell i for sample i (write_block checks the keys against the cube)
    keys = [SampleKey(f"{i}U_{i}R", "center") for i in range(block.start, block.stop)]
    return BlockData(keys=keys, images=images, origin=origin)


def _cube_block(cube: Cube, block: WorkBlock, data: BlockData) -> float:
    t0, c0 = time.perf_counter(), time.process_time()
    cube.write_block(block, data)
    CPU["cube"] += time.process_time() - c0
    return time.perf_counter() - t0


def _plain_block(out: Path, block: WorkBlock, data: BlockData) -> float:
    t0, c0 = time.perf_counter(), time.process_time()
    for m, arr in data.images.items():
        for i in range(block.size):
            with open(out / f"{block.start + i:07d}_{m.name}.raw", "wb") as f:
                f.write(arr[i].tobytes())
    CPU["plain"] += time.process_time() - c0
    return time.perf_counter() - t0


def bench_side_by_side(root: str, spec: CubeSpec, n: int) -> tuple[Cube, float, float, int]:
    """Cube and plain writes of the same blocks, alternating which goes first."""
    cube = Cube.create(os.path.join(root, "cube.zarr"), spec)
    cube.grow([f"{i % 900}U_{i // 900}R" for i in range(n)], ["center"] * n)
    cube = Cube.open(cube.url)  # the worker's view: consolidated metadata, lazily opened group
    out = Path(root, "plain")
    out.mkdir()
    t_cube = t_plain = 0.0
    nbytes = 0
    for k, block in enumerate(cube.blocks()):
        data = make_block(block, spec)
        if k % 2:
            t_plain += _plain_block(out, block, data)
            t_cube += _cube_block(cube, block, data)
        else:
            t_cube += _cube_block(cube, block, data)
            t_plain += _plain_block(out, block, data)
        nbytes += sum(a.nbytes for a in data.images.values())
    return cube, t_cube, t_plain, nbytes


def bench_xarray(root: str, spec: CubeSpec, n: int) -> tuple[float, int]:
    import xarray as xr

    cube = Cube.create(os.path.join(root, "cube_xr.zarr"), spec)
    cube.grow([f"{i % 900}U_{i // 900}R" for i in range(n)], ["center"] * n)
    seconds, nbytes = 0.0, 0
    for block in cube.blocks():
        data = make_block(block, spec)
        dims = ("sample", "iteration", "y", "x", "band")
        ds = xr.Dataset({m.name: (dims, a) for m, a in data.images.items()})
        ds["origin"] = (("sample", "iteration", "modality"), data.origin)
        ds["done"] = (("sample",), np.ones(block.size, dtype=np.uint8))
        t0 = time.perf_counter()
        ds.to_zarr(cube.url, region={"sample": slice(block.start, block.stop)}, mode="r+", zarr_format=3,
                   consolidated=False)
        seconds += time.perf_counter() - t0
        nbytes += sum(a.nbytes for a in data.images.values())
    return seconds, nbytes


def tile_read_ms(cube: Cube, n: int, reads: int = 64) -> float:
    fresh = Cube.open(cube.url)
    fresh.read_tile(0, 0, ALL[0])  # open the group once (metadata), as a reader would
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for s in rng.integers(0, n, reads):
        fresh.read_tile(int(s), 0, ALL[int(s) % len(ALL)])
    return (time.perf_counter() - t0) / reads * 1e3


def du(path: str) -> tuple[int, int]:
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1280)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--shard", type=int, default=0, help="samples per shard (default 0: one per block)")
    ap.add_argument("--zstd-level", type=int, default=CubeSpec.zstd_level)
    ap.add_argument("--compress-tiles", action="store_true", help="zstd tiles (default: raw, as CubeSpec)")
    ap.add_argument("--xarray-samples", type=int, default=256, help="subset written through xarray")
    ap.add_argument("--dir", default=None, help="parent of the temp dir (default: system temp)")
    args = ap.parse_args()
    spec = CubeSpec(tile_size=args.tile, iterations=1, shard_samples=args.shard, block_samples=args.block,
                    zstd_level=args.zstd_level, compress_tiles=args.compress_tiles)
    root = tempfile.mkdtemp(prefix="cube_bench_", dir=args.dir)
    try:
        cube, t_cube, t_plain, nbytes = bench_side_by_side(root, spec, args.samples)
        mb = nbytes / 1e6
        files, size = du(cube.url)
        pfiles, psize = du(os.path.join(root, "plain"))
        print(f"data: {args.samples} samples x {len(spec.modalities)} modalities x {args.tile}x{args.tile}x3 "
              f"uint8 = {mb:.0f} MB, blocks of {args.block}, shard {spec.shard_samples} sample(s), tiles "
              f"{'zstd-' + str(args.zstd_level) if args.compress_tiles else 'raw'}")
        print(f"cube  (Cube.write_block): {mb / t_cube:7.1f} MB/s  ({t_cube:.2f} s, {files} objects, "
              f"{size / 1e6:.0f} MB on disk)")
        print(f"plain files             : {mb / t_plain:7.1f} MB/s  ({t_plain:.2f} s, {pfiles} files, "
              f"{psize / 1e6:.0f} MB on disk)")
        print(f"ratio cube / plain      : {t_plain / t_cube:7.2f}  (wall time)")
        print(f"CPU-time MB/s           : cube {mb / CPU['cube']:.1f}, plain {mb / CPU['plain']:.1f}, "
              f"ratio {CPU['plain'] / CPU['cube']:.2f}  (os.getloadavg()={os.getloadavg()[0]:.1f})")
        print(f"tile read (1 sample, 1 iteration, 1 modality): {tile_read_ms(cube, args.samples):.2f} ms")
        if args.xarray_samples:
            t_xr, xr_bytes = bench_xarray(root, spec, min(args.xarray_samples, args.samples))
            print(f"xarray region to_zarr   : {xr_bytes / 1e6 / t_xr:7.1f} MB/s on {xr_bytes / 1e6:.0f} MB "
                  f"(zarr write_block on the full set: {mb / t_cube:.1f} MB/s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
