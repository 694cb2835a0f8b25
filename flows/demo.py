"""``copgen demo``: the whole mission on a fresh machine, offline, in a few minutes.

A synthetic world (64 cells, some modalities missing; not the world the bundled model was trained on)
→ ``complete`` → a ``loop_study`` (the S2 pair with controls, and a loop through S1RTC) → metrics tables
and the HTML report, all under Prefect on one local Dask cluster, with the small bundled model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from copgen.modalities import ALL
from copgen.storage.fsutil import join_url
from copgen.storage.majortom.synthetic import write_world
from copgen.storage.majortom.world import read_world, write_world_descriptor

# The demo world differs from the bundled model's training world (seed 20261127 at 46.3N 9.2E).
DEMO_WORLD = {"seed": 7, "origin": (45.6, 7.0), "rows": 8, "cols": 8, "thumbnail_size": 384,
              "missing": {"S1RTC": 0.25, "DEM": 0.15, "S2L1C": 0.1}, "cloud_prob": 0.2}


# Work sizes: samples are generated in fixed padded micro-batches (a sample's bytes never depend on how
# work is split), so a block's cost rounds up to a multiple of DEMO_BATCH. Blocks of 24 hold each loop
# condition's ~21 cells (one block per condition: the two sampling conditions run side by side on the
# two workers) and the ~22 incomplete cells, with little padding.
DEMO_BATCH, DEMO_BLOCK = 8, 24
# The demo's study walks the S2 pair (the same scene with and without the atmosphere, the relation the
# bundled model has learnt best, MODEL_CARD.md) with the controls, so the report shows scenes degrading over
# iterations; and, as a second main loop, a cycle through S1RTC, so a newcomer also sees a loop through
# radar (which loses the scene much faster). One more sampling condition: about a third more loop work.
DEMO_LOOP = "S2L2A>S2L1C,S2L2A>S1RTC>S2L2A"


def write_demo_world(out: str, *, seed: int, rows: int, cols: int, origin: tuple[float, float],
                     thumbnail_size: int, missing: Mapping[str, float], cloud_prob: float,
                     with_bands: bool = False, overwrite: bool = False,
                     storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write a world and its ``world.json`` (which also tells readers its thumbnail sizes)."""
    so = dict(storage_options or {})
    summary = write_world(out, seed=seed, origin=origin, rows=rows, cols=cols, thumbnail_size=thumbnail_size,
                          missing=dict(missing), cloud_prob=cloud_prob, with_bands=with_bands,
                          storage_options=so, overwrite=overwrite)
    meta = {
        "synthetic": True,
        "generator": "copgen world (copgen.storage.majortom.synthetic)",
        "note": "procedural scenes: no Copernicus data; for demos, tests and training",
        "seed": seed, "origin": list(origin), "rows": rows, "cols": cols,
        "thumbnail_sizes": {m.name: (summary.dem_size if m.name == "DEM" else summary.thumbnail_size)
                            for m in ALL},
        "missing": dict(missing), "cloud_prob": cloud_prob,
        "cells": list(summary.cells),
        "cells_per_modality": {m.name: len(summary.cells_with(m)) for m in ALL},
    }
    write_world_descriptor(out, meta, so)
    return meta


def run_demo(out: str, *, workers: int = 2, iterations: int = 5, steps: int = 20, console=None,
             progress_factory=None) -> dict[str, Any]:
    from copgen import bundled
    from copgen.flows.clusters import open_cluster, parse_cluster, task_runner
    from copgen.flows.complete import run_complete
    from copgen.flows.jobs import CompleteJob, LoopJob, OutputLayout, SourceSpec
    from copgen.flows.loop_study import run_loop_study
    from copgen.flows.models import ModelSpec
    from copgen.flows.prefect_api import prefect_api
    from copgen.flows.runtime import reporting_progress
    from prefect import flow

    say = console.print if console is not None else print
    world_url = join_url(out, "world")
    world = read_world(world_url)
    if world is not None:
        meta = dict(world.meta)
        say(f"World: reusing {world_url} ({len(meta['cells'])} cells)")
    else:
        say("World: rendering 64 synthetic cells (DEM, S1RTC, S2L1C, S2L2A; some missing) ...")
        meta = write_demo_world(world_url, **DEMO_WORLD)
    source = SourceSpec(root=world_url, thumbnail_sizes=meta["thumbnail_sizes"])
    net, vae = bundled.paths()
    sums = bundled.checksums()
    model = ModelSpec(weights=net, vae=vae, weights_sha256=sums.get("network.safetensors"),
                      vae_sha256=sums.get("autoencoder.safetensors"), steps=steps, solver="2m",
                      batch_size=DEMO_BATCH)

    outputs: dict[str, Any] = {"world": world_url}
    with prefect_api(), open_cluster(parse_cluster("local", n_workers=workers)) as (address, link):
        if link:
            say(f"Dask dashboard: {link}")
        with reporting_progress(progress_factory("complete") if progress_factory else None):
            job = CompleteJob(source=source, out=OutputLayout(join_url(out, "completed")), model=model,
                              patches="center", block_samples=DEMO_BLOCK)
            done = flow(name="complete", task_runner=task_runner(address))(run_complete)(
                job, address=address)
        say(f"complete: {done['samples_done']} samples of {done['cells_planned']} incomplete cells filled, "
            f"{done['quarantined']} quarantined")
        outputs["completed cube"] = done["cube"]
        with reporting_progress(progress_factory("loop_study") if progress_factory else None):
            job = LoopJob(source=source, out=OutputLayout(join_url(out, "study")), model=model,
                          spec=DEMO_LOOP, iterations=iterations, controls="ae-roundtrip,fixed-seed",
                          patches="center", block_samples=DEMO_BLOCK)
            study = flow(name="loop_study", task_runner=task_runner(address))(run_loop_study)(
                job, address=address)
    outputs["loop cubes"] = ", ".join(study["conditions"].values())
    outputs["metrics table"] = study["tables"]["metrics"]
    outputs["provenance tables"] = f"{done['tables']['provenance']}, {study['tables']['provenance']}"
    return {"outputs": outputs, "report": study["report"], "complete": done, "loop": study}
