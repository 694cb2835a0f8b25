"""Synthetic world speed: render (and optionally write) rows x cols cells x 4 modalities on one core.

    python benchmarks/bench_synthetic_world.py --rows 8 --cols 8 --size 1068 [--write /tmp/world]

Prints seconds per cell for rendering (physics + published thumbnail encoders) and for writing
(image encoding + parquet), and the machine's load average (the figures are only comparable when idle).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from copgen.storage.majortom.synthetic import SyntheticWorld, write_world  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--cols", type=int, default=8)
    ap.add_argument("--size", type=int, default=1068)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="also time write_world into a temporary folder")
    args = ap.parse_args()
    world = SyntheticWorld(args.seed, (46.0, 8.0), args.rows, args.cols, thumbnail_size=args.size)
    n = len(world.cells)
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    t0, c0 = time.perf_counter(), time.process_time()
    for rendered in world.iter_rendered():
        assert rendered.thumbnails
    render_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"render {n} cells x 4 modalities at {args.size} px: "
        f"wall {render_s:.1f} s ({render_s / n:.3f} s/cell), "
        f"cpu {cpu_s:.1f} s ({cpu_s / n:.3f} s/cell)"
    )
    if args.write:
        root = tempfile.mkdtemp(prefix="synthetic-world-")
        try:
            t0 = time.perf_counter()
            write_world(root, seed=args.seed, origin=(46.0, 8.0), rows=args.rows, cols=args.cols,
                        thumbnail_size=args.size)  # fmt: skip
            write_s = time.perf_counter() - t0
            print(f"write_world (render + encode + parquet): {write_s:.1f} s ({write_s / n:.3f} s/cell)")
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
