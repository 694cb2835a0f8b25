"""The ``complete`` flow: fill the missing modalities of Major TOM cells into a cube.

plan (pair the source's metadata, filter, find what each cell lacks, skip what the cube already holds)
→ grow the cube (driver only) → one task per work block on the Dask cluster → finalise (summary).
Incremental by construction: a scheduled rerun adds only new samples, and resumes unfinished blocks.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from typing import Any

from copgen.flows import blocks
from copgen.flows.defaults import DEFAULT_SOLVER, DEFAULT_STEPS
from copgen.flows.invalid_rows import hold_back, source_records
from copgen.flows.invalid_rows import refresh as refresh_source_records
from copgen.flows.jobs import CompleteJob, OutputLayout, new_run_id
from copgen.flows.plan import grow_planned, pairs_targets, source_thumbnail_px
from copgen.flows.runtime import fan_out, run_info, run_on_cluster, warn_if_settings_changed
from copgen.flows.warmup import warm_workers
from copgen.storage.cubes import Cube, CubeSpec, licence_attrs
from copgen.storage.ledger import Ledger
from copgen.storage.plans import plan_refs
from prefect import flow

log = logging.getLogger("copgen.complete")


def run_complete(job: CompleteJob, *, address: str | None) -> dict[str, Any]:
    """Plan, grow, process and summarise one completion run (the body of the ``complete`` flow).
    The workers import the block code and load the model meanwhile (flows/warmup.py)."""
    with warm_workers(address, job.model):
        return _run_complete(job, address=address, started=time.time())


def _run_complete(job: CompleteJob, *, address: str | None, started: float) -> dict[str, Any]:
    run_id = job.run_id or new_run_id("complete")
    source, out, filters = job.source, job.out, job.filters
    info = run_info(run_id, job.run_seed, job.model, source, job.patches, invalid_rows=job.invalid_rows)

    reader = source.open(on_error="skip")
    pairing = reader.pair(filters)
    pairs = pairing.pairs
    held: list = []
    if job.invalid_rows == "quarantine":  # a rejected row never turns its real modality into a generated one
        held = source_records(reader, pairing.bad, pairs, filters, run_id)
        pairs = hold_back(pairs, held)
    # columns, not records: the plan of a Major TOM-size run is built one batch at a time (grow_planned)
    targets = pairs_targets(pairs, job.targets, job.regenerate_present)

    # shards of a network batch (when it divides the block): the worker writes them behind generation
    spec = CubeSpec(tile_size=info.sample_size, iterations=2, block_samples=job.block_samples,
                    shard_samples=math.gcd(job.block_samples, job.model.batch_size),
                    latent_shape=info.latent_shape if job.save_latents else None, synthetic=True,
                    title="COP-GEN-Beta dataset completion", provenance={"job": "complete"})
    cube_url = out.cube("complete")
    Cube.refuse_foreign(cube_url, out.storage_options)  # before the lease writes under the URL
    ledger = Ledger(cube_url, out.storage_options)
    with ledger.acquire_lease(run_id, ttl_s=job.lease_ttl_s):
        cube = Cube.create(cube_url, spec, out.storage_options)  # created and grown only under the lease
        refresh_source_records(ledger, held)
        reopened = ledger.reopen_quarantined_blocks(cube) if job.retry_quarantined else []
        added = grow_planned(cube, pairs, targets, pairing.cells, job.patches, job.samples_per_cell,
                             out.storage_options, source_thumbnail_px(source))
        _record_run(cube_url, out, info)
        warn_if_settings_changed(Cube.open(cube_url, out.storage_options).group.attrs, info,
                                 int(cube.done_mask().sum()), cube_url)
        pending = ledger.pending_blocks(cube)
        calls = [(blocks.complete_block, (info, source, out, cube_url, plan), {})
                 for plan in plan_refs(cube, pending, out.storage_options)]
        planned = time.time()
        results = fan_out(address, calls, samples=sum(b.size for b in pending))
        quarantined = ledger.quarantined()
    summary = {
        "run_id": run_id,
        "cube": cube_url,
        "cells_paired": len(pairs),
        "cells_planned": sum(1 for t in targets if t),
        "samples_new": added,
        "samples_total": int(Cube.open(cube_url, out.storage_options, read_only=True).batch_mask().sum()),
        "blocks_run": len(results),
        "samples_run": sum(b.size for b in pending),
        "samples_done": int(Cube.open(cube_url, out.storage_options, read_only=True).done_mask().sum()),
        "quarantined": len({(q.grid_cell, q.patch) for q in quarantined}),
        "quarantine": [asdict(q) for q in quarantined],
        "source_bad_rows": len(pairing.bad),
        "invalid_rows": job.invalid_rows,
        "blocks_retried": len(reopened),
        "duplicates_dropped": {m.name: v for m, v in pairing.duplicates_dropped.items()},
        "tables": {"provenance": out.provenance},
        # worker seconds per block stage, summed over the blocks (flows/blocks.py complete_block)
        "stage_seconds": {k: round(sum(r.get("stages", {}).get(k, 0.0) for r in results), 3)
                          for k in sorted({k for r in results for k in r.get("stages", {})})},
        # where the run's wall time went: seconds from the start of this body (worker clocks included)
        "timeline_s": _timeline(started, planned, results),
    }
    return summary


def _timeline(started: float, planned: float, results: list[dict[str, Any]]) -> dict[str, float]:
    """Planned (blocks about to be submitted), first block started and last block ended in a worker,
    summarised: seconds since ``started`` (epoch clocks of one machine or NTP-synchronised hosts)."""
    starts = [r["started_at"] for r in results if "started_at" in r]
    ends = [r["ended_at"] for r in results if "ended_at" in r]
    marks = {"planned": planned, "first_block_started": min(starts, default=None),
             "last_block_ended": max(ends, default=None), "summarised": time.time()}
    return {k: round(v - started, 3) for k, v in marks.items() if v is not None}


def _record_run(cube_url: str, out: OutputLayout, info) -> None:
    """Run-level provenance in the cube's attrs (driver only), one entry per run."""
    with Cube.open(cube_url, out.storage_options).driver_group() as group:
        runs = dict(group.attrs.get("copgen_runs", {}))
        # inputs count as synthetic only while every run of the cube read the synthetic world
        synthetic = bool(info.synthetic) and bool(group.attrs.get("synthetic_inputs", True) if runs else True)
        runs[info.run_id] = info.provenance()
        group.attrs["copgen_runs"] = runs
        group.attrs["synthetic_inputs"] = synthetic
        group.attrs.update(licence_attrs(synthetic))


@flow(name="complete", log_prints=True)
def complete_flow(
    source: str,
    out: str,
    weights: str,
    vae: str,
    cluster: str = "local",
    workers: int | None = None,
    generate: str = "missing",
    regenerate_present: bool = False,
    patches: str = "center",
    samples_per_cell: int = 1,
    steps: int = DEFAULT_STEPS,
    solver: str = DEFAULT_SOLVER,
    dtype: str = "float32",
    device: str = "auto",
    batch_size: int = 16,
    block_samples: int = 32,
    run_seed: int = 0,
    bbox: tuple[float, float, float, float] | None = None,
    start: str | None = None,
    end: str | None = None,
    max_cloud_cover: float | None = None,
    save_latents: bool = False,
    storage_options: dict[str, Any] | None = None,
    thumbnail_sizes: dict[str, int] | None = None,
    invalid_rows: str = "quarantine",
    retry_quarantined: bool = False,
) -> dict[str, Any]:
    """Dataset completion (the deployable entry point): plain parameters, so a deployment can carry them;
    they map to a :class:`CompleteJob` exactly as the CLI's options do."""
    job = CompleteJob.from_options(
        source=source, out=out, weights=weights, vae=vae, generate=generate,
        regenerate_present=regenerate_present, patches=patches, samples_per_cell=samples_per_cell,
        steps=steps, solver=solver, dtype=dtype, device=device, batch_size=batch_size,
        block_samples=block_samples, run_seed=run_seed, bbox=bbox, start=start, end=end,
        max_cloud_cover=max_cloud_cover, save_latents=save_latents, storage_options=storage_options,
        thumbnail_sizes=thumbnail_sizes, invalid_rows=invalid_rows, retry_quarantined=retry_quarantined)
    return run_on_cluster("complete-blocks", run_complete, job, cluster, workers, artifact="complete",
                          count="samples_run")
