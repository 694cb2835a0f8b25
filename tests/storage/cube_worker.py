"""A real worker process for the cube tests: writes whole blocks with the production commit protocol.

    python tests/storage/cube_worker.py <cube_url> <tables_url> <run_id> <block_id,block_id,...>

Storage options come as JSON in ``COPGEN_TEST_STORAGE_OPTIONS`` (kept off the command line). Crash hooks
for the tests (``COPGEN_TEST_CRASH``): ``mid_data:<block_id>`` writes part of the block's arrays and
exits, ``before_marker:<block_id>`` writes all data and table parts and exits before the marker.
``COPGEN_TEST_PAUSE`` seconds of sleep after each block give a SIGKILL test time to strike.
Prints one line ``wrote <block_id>`` per finished block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from copgen.storage import tables  # noqa: E402
from copgen.storage.cubes import BlockData, Cube, WorkBlock  # noqa: E402
from copgen.storage.ledger import Ledger  # noqa: E402

CRASH_EXIT = 17


def synth_block(cube: Cube, block: WorkBlock) -> BlockData:
    """Deterministic per-sample content: a sample's values depend on its index only."""
    spec = cube.spec
    it, t, nb, nm = spec.iterations, spec.tile_size, spec.bands, len(spec.modalities)
    images = {}
    for mi, m in enumerate(spec.modalities):
        images[m] = np.stack([
            np.random.default_rng([s, int(m)]).integers(0, 256, (it, t, t, nb), dtype=np.uint8)
            for s in range(block.start, block.stop)
        ])
        # a smooth part as well, so the data compress like images rather than noise
        images[m][..., 0] = ((np.arange(t)[None, :] + mi * 7 + np.arange(block.start, block.stop)[:, None])
                             % 256).astype(np.uint8)[:, None, None, :]
    sidx = np.arange(block.start, block.stop)[:, None, None]
    origin = ((sidx + np.arange(it)[None, :, None] + np.arange(nm)[None, None, :]) % 3).astype(np.uint8)
    latents = None
    if spec.latent_shape is not None:
        latents = np.stack([
            np.random.default_rng([s, 99]).standard_normal((it, nm, *spec.latent_shape)).astype(np.float16)
            for s in range(block.start, block.stop)
        ])
    done = (np.arange(block.start, block.stop) % 5) != 4  # every 5th sample "quarantined"
    return BlockData(keys=cube.sample_keys(block.start, block.stop), images=images, origin=origin,
                     latents=latents, done=done)


def provenance_rows(cube: Cube, block: WorkBlock) -> list[dict]:
    cells = cube.group["grid_cell"][block.start:block.stop]
    patches = cube.group["patch"][block.start:block.stop]
    rows = []
    for i, s in enumerate(range(block.start, block.stop)):
        for m in cube.spec.modalities:
            rows.append({"grid_cell": str(cells[i]), "patch": str(patches[i]), "sample": s, "iteration": 0,
                         "modality": m.name, "origin": "generated", "conditioned_on": ["S2L2A"],
                         "seed": 1000 + s, "sampler": "dpm_solver++", "steps": 50, "synthetic": True})
    return rows


def spawn(
    cube_url: str,
    tables_url: str,
    run_id: str,
    blocks: Iterable[WorkBlock],
    storage_options: Mapping | None = None,
    crash: str = "",
    pause: float = 0.0,
) -> subprocess.Popen:
    """Start one worker process on ``blocks`` (stdout piped: one ``wrote <id>`` line per block)."""
    env = {**os.environ, "COPGEN_TEST_STORAGE_OPTIONS": json.dumps(dict(storage_options or {})),
           "COPGEN_TEST_CRASH": crash, "COPGEN_TEST_PAUSE": str(pause)}
    ids = ",".join(b.id for b in blocks)
    return subprocess.Popen([sys.executable, __file__, cube_url, tables_url, run_id, ids], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, list[str]]:
    """Wait for a worker; returns its exit code and the block ids it reported written."""
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode not in (0, CRASH_EXIT):
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{err[-3000:]}")
    return proc.returncode, [line.split()[1] for line in out.splitlines() if line.startswith("wrote ")]


def snapshot(url: str, storage_options: Mapping | None = None) -> dict[str, bytes]:
    """Every object under ``url`` as ``{relative path: bytes}``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    fs.invalidate_cache()
    root = root.rstrip("/")
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def main() -> None:
    cube_url, tables_url, run_id, block_ids = sys.argv[1:5]
    so = json.loads(os.environ.get("COPGEN_TEST_STORAGE_OPTIONS", "{}"))
    crash = os.environ.get("COPGEN_TEST_CRASH", "")
    pause = float(os.environ.get("COPGEN_TEST_PAUSE", "0"))
    cube = Cube.open(cube_url, so)
    ledger = Ledger(cube_url, so)
    for block in (WorkBlock.parse(b) for b in block_ids.split(",") if b):
        data = synth_block(cube, block)
        if crash == f"mid_data:{block.id}":
            # what a process killed inside write_block leaves: some arrays written, others and ``done`` not
            first = cube.spec.modalities[0]
            cube.group[first.name][block.start:block.stop] = data.images[first]
            os._exit(CRASH_EXIT)
        digests = cube.write_block(block, data)
        tables.write_provenance(tables_url, run_id, block.id, provenance_rows(cube, block), so)
        if crash == f"before_marker:{block.id}":
            os._exit(CRASH_EXIT)
        ledger.mark_done(block, run_id, digests, n_done=int(np.count_nonzero(data.done)))
        print(f"wrote {block.id}", flush=True)
        time.sleep(pause)


if __name__ == "__main__":
    main()
