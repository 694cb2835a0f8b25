"""``copgen inspect``: what a cube holds, for people and for scripts (``--json``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from copgen.records import Origin
from copgen.storage.cubes import Cube
from copgen.storage.ledger import Ledger


def samples_by_run(ledger: Ledger, cube: Cube) -> dict[str, int]:
    """Finished samples per run id, from the block markers (the run that completed each block)."""
    out: dict[str, int] = {}
    for marker in (ledger.marker(b) for b in cube.blocks()):
        if marker:
            run = str(marker.get("run_id", ""))
            out[run] = out.get(run, 0) + int(marker.get("n_done", 0))
    return out


def summarise(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    cube = Cube.open(url, storage_options, read_only=True)
    n = cube.n_samples
    origin = cube.origins()
    attrs = cube.attrs
    origins = []
    for k in range(cube.spec.iterations):
        for j, m in enumerate(cube.spec.modalities):
            col = origin[:, k, j]
            origins.append({"iteration": k, "modality": m.name, "real": int((col == Origin.REAL).sum()),
                            "generated": int((col == Origin.GENERATED).sum()),
                            "absent": int((col == Origin.ABSENT).sum())})
    ledger = Ledger(url, storage_options)
    return {
        "url": url,
        "samples": n,
        "done": int(cube.done_mask().sum()) if n else 0,
        "cells": len(set(cube.grid_cells())),
        "iterations": cube.spec.iterations,
        "tile_size": cube.spec.tile_size,
        "modalities": [m.name for m in cube.spec.modalities],
        "blocks": len(cube.blocks()),
        "blocks_pending": len(ledger.pending_blocks(cube)) if n else 0,
        "origins": origins,
        "runs": dict(attrs.get("copgen_runs", {})),
        "samples_by_run": samples_by_run(ledger, cube) if n else {},
        "provenance": dict(attrs.get("copgen_provenance", {})),
        "licence": attrs.get("license"),
        "quarantined": [asdict(q) for q in ledger.quarantined()],
    }
