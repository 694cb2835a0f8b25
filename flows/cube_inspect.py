"""``copgen inspect``: what a cube holds, for people and for scripts (``--json``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from copgen.loop import Origin
from copgen.storage.cubes import Cube
from copgen.storage.ledger import Ledger, markers_by_id


def samples_by_run(ledger: Ledger, cube: Cube) -> dict[str, int]:
    """Finished samples per run id, from the block markers (the run that completed each block)."""
    out: dict[str, int] = {}
    for marker in markers_by_id(ledger, cube.blocks()).values():
        if marker:
            run = str(marker.get("run_id", ""))
            out[run] = out.get(run, 0) + int(marker.get("n_done", 0))
    return out


def summarise(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    cube = Cube.open(url, storage_options)
    g = cube.group
    n = cube.n_samples
    empty = np.zeros((0, cube.spec.iterations, len(cube.spec.modalities)))
    origin = np.asarray(g["origin"][:]) if n else empty
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
        "cells": len({str(c) for c in g["grid_cell"][:]}) if n else 0,
        "iterations": cube.spec.iterations,
        "tile_size": cube.spec.tile_size,
        "modalities": [m.name for m in cube.spec.modalities],
        "blocks": len(cube.blocks()),
        "blocks_pending": len(ledger.pending_blocks(cube)) if n else 0,
        "origins": origins,
        "runs": dict(g.attrs.get("copgen_runs", {})),
        "samples_by_run": samples_by_run(ledger, cube) if n else {},
        "provenance": dict(g.attrs.get("copgen_provenance", {})),
        "licence": g.attrs.get("license"),
        "quarantined": [asdict(q) for q in ledger.quarantined()],
    }
