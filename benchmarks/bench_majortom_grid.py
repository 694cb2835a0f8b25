"""Throughput of the vectorised Major TOM grid (prints figures; no asserts).

python benchmarks/bench_majortom_grid.py [n_points]
"""

from __future__ import annotations

import sys
import time

import numpy as np
from copgen.storage.majortom import grid


def _time(label: str, fn, n: int) -> None:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    print(f"{label:<34} {best * 1e3:9.1f} ms   {n / best / 1e6:7.2f} M/s")


def main(n: int = 1_000_000) -> None:
    t0 = time.perf_counter()
    grid._tables()
    grid._name_tables()
    print(f"grid tables built (cached once per process): {time.perf_counter() - t0:.3f} s")
    rng = np.random.default_rng(0)
    lat = rng.uniform(-84.9, 85.0, n)
    lon = rng.uniform(-180.0, 180.0, n)
    cells = grid.latlon_to_cell(lat, lon)
    print(f"n = {n:,} points")
    _time("latlon_to_rowcol", lambda: grid.latlon_to_rowcol(lat, lon), n)
    _time("latlon_to_cell (ids)", lambda: grid.latlon_to_cell(lat, lon), n)
    _time("parse_cell (ids -> ints)", lambda: grid.parse_cell(cells), n)
    _time("cell_bottom_left", lambda: grid.cell_bottom_left(cells), n)
    _time("cell_utm_epsg", lambda: grid.cell_utm_epsg(cells), n)
    m = min(n, 100_000)
    _time(f"cell_centre ({m:,})", lambda: grid.cell_centre(cells[:m]), m)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
