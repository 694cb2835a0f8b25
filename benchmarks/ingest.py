"""Major TOM ingestion throughput: metadata (filter + dedup + pair) and sample fetch (+ decode + cut).

Builds synthetic worlds with the writer in a temp dir, then prints:
  1. metadata rows/s for read + checks + filters + de-duplication + pairing over all four modalities
     (``--cells`` cells written by the writer, thumbnails only; plus an optional ``--scale-rows`` point
     where each modality's metadata is replicated onto more valid cells: pairing never touches images);
  2. samples/s for fetching one row group, decoding the thumbnail and cutting it into 256 px samples
     (``--fetch-cells`` S2L2A cells with published-size 1068 px JPEG thumbnails, and DEM 356 px PNG);
  3. with ``--plan-cells 10000,100000,2200000``: the completion run's driver plan at Major TOM scale
     (metadata of N cells per modality in the published columns, S1RTC missing on 30 %): pair, targets,
     plan objects + cube grow, and the block tasks' plan references, exactly as ``flows/complete.py``
     runs them; each point in a fresh process, with its time and peak RSS above the process's baseline
     next to the metadata's size; then a worker's peak RSS reading one block's plan (``PlanRef.load``),
     and the same plan again on the grown cube (a scheduled rerun: nothing new).

    python benchmarks/ingest.py [--cells 3000] [--scale-rows 500000] [--fetch-cells 200]
    python benchmarks/ingest.py --plan-cells 10000,100000,2200000 --plan-only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from copgen.modalities import Modality
from copgen.storage.majortom import grid
from copgen.storage.majortom.reader import MajorTomReader, MetadataFilter
from copgen.storage.majortom.thumbnails import to_samples
from copgen.storage.majortom.writer import synthetic_records, write_dataset


def random_cells(n: int, seed: int) -> list[str]:
    """``n`` distinct valid cells over land-ish latitudes (-60..70), in a seeded random order."""
    rng = np.random.default_rng(seed)
    pool = np.asarray([], dtype=object)
    while len(pool) < n:
        lat = rng.uniform(-60, 70, 2 * n)
        lon = rng.uniform(-180, 180, 2 * n)
        pool = np.unique(np.concatenate([pool, grid.latlon_to_cell(lat, lon).astype(object)]))
    return list(rng.permutation(pool)[:n])


def build_metadata_world(root: Path, cells: list[str], seed: int) -> None:
    """All four modalities, tiny thumbnails; S1 misses 30 %, DEM 5 %; S2L2A repeats 0.3 % of its cells."""
    rng = np.random.default_rng(seed)
    for m in Modality:
        keep = {Modality.S1RTC: 0.7, Modality.DEM: 0.95}.get(m, 1.0)
        mine = [c for c in cells if rng.random() < keep]
        if m == Modality.S2L2A:
            mine += list(rng.choice(mine, size=max(1, len(mine) * 3 // 1000), replace=False))
        write_dataset(
            str(root), m, synthetic_records(m, mine, thumbnail_size=8, seed=seed), rows_per_part=500
        )


def scale_metadata(src: Path, dst: Path, rows: int, seed: int) -> int:
    """Copy each modality's metadata onto ``rows`` valid cells (same parquet_url/row, new ids)."""
    cells = np.asarray(random_cells(rows, seed + 1))
    rows_u, cols_r = grid.parse_cell(cells)
    epsg = grid.cell_utm_epsg(cells)  # each cell's own CRS and centre, as published (georeferencing)
    lat, lon = grid.cell_centre(cells)
    crs = np.char.add("EPSG:", epsg.astype(str)).astype(object)
    total = 0
    for m in Modality:
        table = pq.read_table(src / m.dataset / "metadata.parquet")
        take = np.arange(len(cells)) % table.num_rows
        big = table.take(pa.array(take))
        keep = np.random.default_rng(seed + int(m)).random(len(cells)) < (0.7 if m == Modality.S1RTC else 1.0)
        big = big.filter(pa.array(keep))
        for name, values in (
            ("grid_cell", cells[keep]),
            ("grid_row_u", rows_u[keep]),
            ("grid_col_r", cols_r[keep]),
            ("crs", crs[keep]),
            ("centre_lat", lat[keep]),
            ("centre_lon", lon[keep]),
        ):
            i = big.schema.get_field_index(name)
            big = big.set_column(i, big.schema.field(i), pa.array(values, type=big.schema.field(i).type))
        (dst / m.dataset).mkdir(parents=True, exist_ok=True)
        pq.write_table(big, dst / m.dataset / "metadata.parquet")
        total += big.num_rows
    return total


def time_pairing(root: Path, repeats: int = 3) -> tuple[float, int, int, dict]:
    flt = MetadataFilter(max_cloud_cover=80.0, max_nodata=0.5, start="2023-01-01", end="2035-12-31")
    best = float("inf")
    for _ in range(repeats):
        with MajorTomReader(str(root), resolve_parquet_urls="as-is") as reader:
            t0 = time.perf_counter()
            pairing = reader.pair(flt)
            best = min(best, time.perf_counter() - t0)
    rows = sum(md.rows_read for md in pairing.metadata.values())
    dropped = {m.name: n for m, n in pairing.duplicates_dropped.items() if n}
    return best, rows, len(pairing.pairs), dropped


def time_fetch(root: Path, modality: Modality, patch: str) -> tuple[float, int, int, int]:
    with MajorTomReader(str(root), modalities=[modality]) as reader:
        refs = reader.refs(reader.read_metadata(modality).frame, modality)
        t0 = time.perf_counter()
        n_samples = 0
        nbytes = 0
        for block in range(0, len(refs), 32):  # blocks, as a worker task would take them
            result = reader.read_samples(refs[block : block + 32])
            for sample in result.samples:
                n_samples += len(to_samples(sample.thumbnail, modality, patch=patch, sample_size=256))
                nbytes += sample.thumbnail.nbytes
        elapsed = time.perf_counter() - t0
    return elapsed, len(refs), n_samples, nbytes


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process in MB (Linux /proc)."""
    lines = Path("/proc/self/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _reset_peak() -> None:
    """Count the peak from here (Linux: writing 5 to clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def plan_build(n: int, root: Path, seed: int) -> None:
    """Metadata of ``n`` cells per modality (S1RTC on 70 %), copied from a small written world."""
    build_metadata_world(root / "small", random_cells(300, seed), seed)
    scale_metadata(root / "small", root / "meta", n, seed)


def plan_point(root: Path, block_samples: int = 32) -> dict:
    """The driver's side of a completion run over ``root/meta``, step by step as flows/complete.py."""
    from copgen.flows.jobs import SourceSpec
    from copgen.flows.plan import grow_planned, pairs_targets
    from copgen.storage.cubes import Cube, CubeSpec
    from copgen.storage.ledger import Ledger
    from copgen.storage.plans import plan_refs

    source = SourceSpec(root=str(root / "meta"))
    spec = CubeSpec(tile_size=64, iterations=2, block_samples=block_samples)
    cube = Cube.create(str(root / "cube.zarr"), spec)
    base, _ = _rss_mb()
    _reset_peak()
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    pairing = source.open(on_error="skip").pair()
    pairs = pairing.pairs
    t["pair"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    targets = pairs_targets(pairs, None, False)
    t["targets"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    added = grow_planned(cube, pairs, targets, pairing.cells, "center", 1, None)
    t["grow"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    refs = plan_refs(cube, Ledger(cube.url).pending_blocks(cube), None)
    t["refs"] = time.perf_counter() - t0
    now, peak = _rss_mb()
    meta_bytes = sum(p.stat().st_size for p in (root / "meta").glob("*/metadata.parquet"))
    return {"cells": len(pairs), "samples": added, "blocks": len(refs), "batches": len(cube.batches),
            "seconds": t, "base_mb": base, "peak_mb": peak, "end_mb": now, "metadata_mb": meta_bytes / 1e6}


def plan_worker(root: Path) -> dict:
    """A worker's side: the plan of one block (the last), as a block task reads it."""
    from copgen.storage.cubes import Cube
    from copgen.storage.plans import PlanRef

    cube = Cube.open(str(root / "cube.zarr"))
    ref = PlanRef(cube.url, cube.blocks()[-1])
    base, _ = _rss_mb()
    _reset_peak()
    t0 = time.perf_counter()
    plan = ref.load()
    secs = time.perf_counter() - t0
    _, peak = _rss_mb()
    return {"samples": len(plan.samples), "seconds": secs, "base_mb": base, "peak_mb": peak}


def plan_scale(sizes: list[int], seed: int) -> None:
    script = [sys.executable, __file__, "--seed", str(seed)]
    print("| cells per modality | metadata parquet (4 files) | pair | targets | plan objects + grow "
          "| block refs | total | driver peak RSS above baseline | per 1k cells "
          "| worker: one block's plan, peak RSS above baseline | rerun (nothing new): time, driver peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="copgen-plan-") as tmp:
            subprocess.run([*script, "--plan-build", str(n), "--plan-dir", tmp], check=True)
            out = subprocess.run([*script, "--plan-point", tmp], check=True, capture_output=True, text=True)
            d = json.loads(out.stdout.strip().splitlines()[-1])
            # the same run again (a scheduled rerun): the cube holds every sample, nothing is added
            out = subprocess.run([*script, "--plan-point", tmp], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r["samples"] == 0, r
            out = subprocess.run([*script, "--plan-worker", tmp], check=True, capture_output=True, text=True)
            w = json.loads(out.stdout.strip().splitlines()[-1])
        s = d["seconds"]
        grown = d["peak_mb"] - d["base_mb"]
        print(f"| {n:,} | {d['metadata_mb']:.0f} MB | {s['pair']:.1f} s | {s['targets']:.2f} s "
              f"| {s['grow']:.1f} s "
              f"({d['batches']} batches) | {s['refs']:.1f} s ({d['blocks']:,}) | {sum(s.values()):.1f} s "
              f"| {grown:,.0f} MB | {grown / n * 1e3:.2f} MB | {w['peak_mb'] - w['base_mb']:.1f} MB "
              f"({w['samples']} samples, {w['seconds'] * 1e3:.0f} ms) | {sum(r['seconds'].values()):.1f} s, "
              f"{r['peak_mb'] - r['base_mb']:,.0f} MB |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=3000)
    ap.add_argument("--scale-rows", type=int, default=500_000, help="0 disables the large metadata point")
    ap.add_argument("--fetch-cells", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plan-cells", default=None, help="comma-separated cell counts for the plan-scale table")
    ap.add_argument("--plan-only", action="store_true", help="only the plan-scale table")
    ap.add_argument("--plan-build", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan-point", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plan_build is not None:
        return plan_build(args.plan_build, Path(args.plan_dir), args.seed)
    if args.plan_point is not None:
        return print(json.dumps(plan_point(Path(args.plan_point))))
    if args.plan_worker is not None:
        return print(json.dumps(plan_worker(Path(args.plan_worker))))
    if args.plan_cells:
        plan_scale([int(v) for v in args.plan_cells.split(",")], args.seed)
        if args.plan_only:
            return

    with tempfile.TemporaryDirectory(prefix="copgen-ingest-") as tmp:
        tmp_path = Path(tmp)
        cells = random_cells(args.cells, args.seed)
        t0 = time.perf_counter()
        build_metadata_world(tmp_path / "meta", cells, args.seed)
        print(
            f"write   {args.cells} cells x 4 modalities (8 px thumbnails): {time.perf_counter() - t0:.1f} s"
        )
        secs, rows, pairs, dropped = time_pairing(tmp_path / "meta")
        print(
            f"pairing {rows:>9,} metadata rows -> {pairs:,} cells in {secs * 1e3:7.1f} ms: "
            f"{rows / secs:>12,.0f} rows/s  (dedup dropped {dropped})"
        )
        if args.scale_rows:
            total = scale_metadata(tmp_path / "meta", tmp_path / "scaled", args.scale_rows, args.seed)
            secs, rows, pairs, dropped = time_pairing(tmp_path / "scaled", repeats=2)
            print(
                f"pairing {rows:>9,} metadata rows -> {pairs:,} cells in {secs * 1e3:7.1f} ms: "
                f"{rows / secs:>12,.0f} rows/s  (scaled metadata, {total:,} rows written)"
            )

        fetch_cells = cells[: args.fetch_cells]
        for m, fmt in ((Modality.S2L2A, "jpeg"), (Modality.DEM, "png")):
            t0 = time.perf_counter()
            write_dataset(
                str(tmp_path / "fetch"),
                m,
                synthetic_records(m, fetch_cells, seed=args.seed),
                thumbnail_format=fmt,
                rows_per_part=100,
            )
            size = sum(p.stat().st_size for p in (tmp_path / "fetch" / m.dataset / "images").iterdir())
            print(
                f"write   {len(fetch_cells)} {m.name} cells, published-size {fmt.upper()} thumbnails: "
                f"{time.perf_counter() - t0:.1f} s, {size / len(fetch_cells) / 1e3:.0f} kB/cell"
            )
            for patch in ("all", "center"):
                secs, n_cells, n_samples, _ = time_fetch(tmp_path / "fetch", m, patch)
                print(
                    f"fetch   {m.name:<5} patch={patch:<6} {n_cells} cells -> {n_samples:>5} 256 px samples: "
                    f"{n_cells / secs:7.1f} cells/s, {n_samples / secs:8.1f} samples/s"
                )


if __name__ == "__main__":
    main()
