"""The ``loop_study`` flow: self-loop conditioning K times on cells with all four real modalities.

Complete cells are split (deterministically, by the run seed) into loop cells and a disjoint held-out
real reference set of the same size. Every condition — the main loop and each control (autoencoder
round-trip only, the other seed policy, real-data injection, latent carry) — gets its own cube
``<out>/loop-<condition>.zarr`` with iterations 0..K, so the curves can be told apart. Blocks of all
conditions run on the cluster in one wave; then, per condition, a metrics task aggregates the per-sample
paired metrics (bootstrap CIs over cells) and computes the distribution metrics against the reference set
at every iteration (iteration 0 = real vs real: the noise floor), and the report is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from copgen.flows import blocks
from copgen.flows.defaults import DEFAULT_SOLVER, DEFAULT_STEPS
from copgen.flows.jobs import JobError, LoopJob, OutputLayout, RunInfo, SourceSpec, new_run_id, parse_controls
from copgen.flows.plan import grow_with_plan, new_samples, sample_plans, source_thumbnail_px, split_cells
from copgen.flows.report_data import PER_SAMPLE_KEY, latest_rows, run_order
from copgen.flows.runtime import fan_out, run_info, run_on_cluster
from copgen.loop import LoopConfig, LoopError
from copgen.metrics import MetricInputError, bootstrap_mean_ci, evaluate_modality, get_extractor
from copgen.metrics.errors import as_uint8_batch
from copgen.modalities import Modality
from copgen.records import Origin, SamplePlan
from copgen.storage import tables
from copgen.storage.cubes import Cube, CubeSpec
from copgen.storage.ledger import Ledger
from copgen.storage.plans import plan_refs
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

log = logging.getLogger("copgen.loop")
SET_CI_RESAMPLES = 200  # bootstrap CIs of FD/KID/precision/... over cells: ~1 s per iteration and modality


def _describe(cfg: LoopConfig) -> dict[str, Any]:
    """The loop condition as plain JSON values (cube attrs, report)."""
    return {"spec": str(cfg.spec), "iterations": cfg.iterations, "seed_policy": cfg.seed_policy.value,
            "control": cfg.control.value, "inject_p": cfg.inject_p, "carry": cfg.carry.value,
            "run_seed": cfg.run_seed, "joint": cfg.joint}


def condition_slug(config: LoopConfig) -> str:
    """A short, path-safe, unique name for a condition's cube and table parts."""
    text = re.sub(r"[^a-z0-9]+", "-", config.label.lower()).strip("-")[:48]
    return f"{text}-{hashlib.blake2b(config.label.encode(), digest_size=3).hexdigest()}"


# ---- per-condition metrics (a task on the cluster) ------------------------------------------------------


@task(name="loop-metrics", cache_policy=NO_CACHE, persist_result=False)
def loop_metrics_task(info: RunInfo, source: SourceSpec, out: OutputLayout, cube_url: str, config: LoopConfig,
                      reference_samples: Sequence[SamplePlan], extractor_name: str) -> dict[str, Any]:
    return loop_metrics(info, source, out, cube_url, config, reference_samples, extractor_name)


def loop_metrics(info: RunInfo, source: SourceSpec, out: OutputLayout, cube_url: str, config: LoopConfig,
                 reference_samples: Sequence[SamplePlan], extractor_name: str = "auto") -> dict[str, Any]:
    """Summary rows for one condition: paired metrics with bootstrap CIs over cells, and distribution
    metrics of every iteration's generated set against the held-out reference set."""
    ctx = blocks.metric_context(config, info)
    cube = Cube.open(cube_url, out.storage_options, read_only=True)
    rows = _paired_rows(cube, out, config, info, ctx)
    extractor = get_extractor(extractor_name)
    reference, ref_features = _reference_set(source, reference_samples, cube.spec.modalities, info, extractor)
    ref_name = f"{len(reference_samples)} held-out complete cells" if reference is not None else None
    rows += _distribution_rows(cube, config, info, ctx, extractor, reference, ref_features, ref_name)
    part = f"summary-{condition_slug(config)}"
    tables.write_metrics(out.metrics, info.run_id, part, rows, out.storage_options)
    _summarise_into_cube(cube_url, out, rows)
    return {"condition": config.label, "rows": len(rows), "samples": int(cube.done_mask().sum())}


def _paired_rows(cube: Cube, out: OutputLayout, config: LoopConfig, info: RunInfo, ctx: dict) -> list[dict]:
    """Paired metrics: the per-sample rows the blocks wrote, aggregated (bootstrap over cells). A rerun or
    resume generates only the blocks that were missing: the rows of the earlier runs of this cube count
    too (the latest run's row wins where a block was redone)."""
    rows = []
    per_sample = tables.read_table(out.metrics, out.storage_options)
    per_sample = per_sample[(per_sample["condition"] == config.label) & (per_sample["level"] == "sample")]
    per_sample = latest_rows(per_sample, PER_SAMPLE_KEY, run_order(cube.attrs, info.run_id))
    for (k, m, metric, comp), grp in per_sample.groupby(["iteration", "modality", "metric", "comparison"]):
        ci = bootstrap_mean_ci(grp["value"].to_numpy(float), groups=grp["grid_cell"].to_numpy(),
                               seed=info.run_seed)
        rows.append({**ctx, "iteration": int(k), "modality": m, "metric": metric, "comparison": comp,
                     "value": ci.value, "ci_low": ci.ci_low, "ci_high": ci.ci_high, "n": ci.n})
    return rows


def _reference_set(source: SourceSpec, reference_samples: Sequence[SamplePlan], mods, info: RunInfo,
                   extractor) -> tuple[dict | None, dict]:
    """The held-out real reference images (complete samples only) and their features, extracted once per
    modality (the reference set is the same at every iteration); ``(None, {})`` without reference cells."""
    if not len(reference_samples):
        return None, {}
    ref_in = blocks.read_block_inputs(source, reference_samples, mods, info.sample_size, info.run_id,
                                      "reference")
    ok = np.ones(len(reference_samples), bool)
    for m in mods:
        ok &= ref_in.have[m]
    reference = {m: ref_in.images[m][ok] for m in mods}
    ref_features = {}
    for m in mods:
        with contextlib.suppress(MetricInputError):  # e.g. an empty set: evaluate_modality reports it
            ref_features[m] = extractor(as_uint8_batch(reference[m], "reference", f"modality {m.name}"))
    return reference, ref_features


def _distribution_rows(cube: Cube, config: LoopConfig, info: RunInfo, ctx: dict, extractor, reference,
                       ref_features: dict, ref_name: str | None) -> list[dict]:
    """Distribution metrics: the generated set at every iteration k vs the reference set (k = 0: the real
    loop cells, the noise floor)."""
    done = cube.done_mask()
    cells, origin = cube.grid_cells()[done], cube.origins()[done]
    rows = []
    for k in range(cube.spec.iterations):
        for j, m in enumerate(cube.spec.modalities):
            present = origin[:, k, j] != Origin.ABSENT
            if not present.any():
                continue
            images = cube.tiles(m, np.flatnonzero(done)[present], k)
            ref = None if reference is None else reference[m]
            try:
                found = evaluate_modality(m, images, reference=ref, reference_features=ref_features.get(m),
                                          extractor=extractor,
                                          cells=list(cells[present]), seed=info.run_seed, per_sample=False,
                                          set_ci_resamples=SET_CI_RESAMPLES)
            except MetricInputError as exc:  # too few samples for set metrics: keep the per-set statistics
                log.warning("%s, iteration %d, %s: no distribution metrics (%s)", config.label, k, m.name,
                            exc)
                found = evaluate_modality(m, images, per_sample=False)
            for r in found:
                rows.append({**ctx, "iteration": k, "modality": r["modality"], "metric": r["metric"],
                             "comparison": r["comparison"], "value": r["value"], "ci_low": r["ci_low"],
                             "ci_high": r["ci_high"],
                             "n": r["n"] if r["n"] is not None else int(present.sum()),
                             "feature_extractor": r["feature_extractor"], "bin": r["bin"],
                             "reference_set": ref_name if r["comparison"] == "reference" else None})
    return rows


def _summarise_into_cube(cube_url: str, out: OutputLayout, rows: list[dict]) -> None:
    """``metrics/`` subgroup of the cube: value, ci_low, ci_high over (iteration, modality, metric) where
    metric is ``<name>/<comparison>`` (summary rows only, histograms left to the table)."""
    df = pd.DataFrame([r for r in rows if r.get("bin") is None])
    if df.empty:
        return
    df["key"] = df["metric"] + "/" + df["comparison"]
    with Cube.open(cube_url, out.storage_options).driver_group() as group:
        _write_summary(group.require_group("metrics"), df)


def _write_summary(sub, df: pd.DataFrame) -> None:
    its = sorted(df["iteration"].unique())
    modalities = [m.name for m in Modality if m.name in set(df["modality"])]
    keys = sorted(df["key"].unique())
    for name in ("value", "ci_low", "ci_high"):
        arr = np.full((len(its), len(modalities), len(keys)), np.nan)
        for r in df.itertuples():
            arr[its.index(r.iteration), modalities.index(r.modality), keys.index(r.key)] = getattr(r, name)
        z = sub.create_array(name, shape=arr.shape, dtype="float64", fill_value=np.nan, overwrite=True,
                             dimension_names=["iteration", "modality", "metric"])
        z[:] = arr
    for name, values, dtype in (("iteration", np.asarray(its, "int32"), "int32"),
                                ("modality", np.asarray(modalities, dtype=object), str),
                                ("metric", np.asarray(keys, dtype=object), str)):
        z = sub.create_array(name, shape=(len(values),), dtype=dtype, overwrite=True, dimension_names=[name])
        z[:] = values


# ---- the flow body --------------------------------------------------------------------------------------


def run_loop_study(job: LoopJob, *, address: str | None) -> dict[str, Any]:
    """Loop every condition over the study's cells, then its metrics and report (the flow's body)."""
    run_id = job.run_id or new_run_id("loop")
    source, out = job.source, job.out
    configs = job.configs()
    info = run_info(run_id, job.run_seed, job.model, source, job.patches)

    pairing = source.open(on_error="skip").pair()
    complete = pairing.cells(pairing.complete)
    if not complete:
        raise JobError("no cell of the source has all four modalities: the loop study needs complete cells")
    loop_cells, ref_cells = split_cells(complete, job.cells, job.reference_cells, job.run_seed)
    samples = sample_plans(loop_cells, job.patches, 1)
    ref_samples = sample_plans(ref_cells, job.patches, 1)

    cubes: dict[str, str] = {}
    calls: list = []
    leases: list = []
    try:
        for cfg in configs:
            url = out.cube(f"loop-{condition_slug(cfg)}")
            calls += _prepare_condition(job, info, cfg, url, samples, leases)
            cubes[cfg.label] = url
        results = fan_out(address, calls, samples=sum(c[1][4].block.size for c in calls))
        metric_futures = [loop_metrics_task.submit(info, source, out, cubes[cfg.label], cfg, ref_samples,
                                                   job.feature_extractor) for cfg in configs]
        metric_results = [f.result() for f in metric_futures]
        quarantined = sorted({(q.grid_cell, q.patch) for url in cubes.values()
                              for q in Ledger(url, out.storage_options).quarantined()})
    finally:
        for lease in leases:
            lease.release()

    report_path = None
    if job.report:
        report_path = _write_report(out, cubes, info)
    return {
        "run_id": run_id,
        "conditions": {cfg.label: cubes[cfg.label] for cfg in configs},
        "loop_cells": len(loop_cells),
        "reference_cells": len(ref_cells),
        "samples": len(samples),
        "blocks_run": len(results),
        "metrics": metric_results,
        "quarantined": len(quarantined),
        "quarantine": [{"grid_cell": c, "patch": p} for c, p in quarantined],
        "tables": {"metrics": out.metrics, "provenance": out.provenance},
        "report": report_path,
    }


def _prepare_condition(job: LoopJob, info: RunInfo, cfg: LoopConfig, url: str, samples: Sequence[SamplePlan],
                       leases: list) -> list:
    """One condition's cube at ``url``: refused when foreign, leased (the lease appended to ``leases``, so
    the caller releases it whatever happens next), created and grown with the study's samples; returns the
    block calls still pending."""
    source, out = job.source, job.out
    cube_spec = CubeSpec(tile_size=info.sample_size, iterations=job.iterations + 1,
                         block_samples=job.block_samples, synthetic=True,
                         title=f"COP-GEN-Beta self-loop study: {cfg.label}",
                         provenance={"job": "loop_study", "condition": cfg.label, "loop": _describe(cfg)})
    Cube.refuse_foreign(url, out.storage_options)  # before the lease writes under the URL
    ledger = Ledger(url, out.storage_options)
    leases.append(ledger.acquire_lease(info.run_id))
    cube = Cube.create(url, cube_spec, out.storage_options)  # created and grown only under the lease
    grow_with_plan(cube, new_samples(cube, samples), out.storage_options, source_thumbnail_px(source))
    from copgen.flows.complete import _record_run

    _record_run(url, out, info)
    pending = ledger.pending_blocks(cube)
    return [(blocks.loop_block, (info, source, out, url, plan, cfg), {})
            for plan in plan_refs(cube, pending, out.storage_options)]


def _write_report(out: OutputLayout, cubes: dict[str, str], info: RunInfo) -> str | None:
    """The study's report from every loop cube in ``out`` and every run of the metrics table, so a rerun
    or resume (which generates only the missing blocks) never reports less than the runs before it."""
    from copgen.flows.report import build_report, study_cubes
    from copgen.storage.fsutil import join_url

    every = {**study_cubes(out.out, out.storage_options), **cubes}
    path = build_report(join_url(out.out, "report"), metrics_url=out.metrics, cubes=every,
                        storage_options=out.storage_options,
                        provenance={"synthetic_inputs": info.synthetic})
    return str(path)


@flow(name="loop_study", log_prints=True)
def loop_study_flow(
    source: str,
    out: str,
    weights: str,
    vae: str,
    spec: str = "S2L2A>S1RTC",
    iterations: int = 5,
    seed_policy: str = "fresh",
    controls: str = "ae-roundtrip,fixed-seed",
    inject_p: float = 0.0,
    carry: str = "image",
    joint: bool = False,
    cluster: str = "local",
    workers: int | None = None,
    patches: str = "center",
    cells: int | None = None,
    reference_cells: int | None = None,
    steps: int = DEFAULT_STEPS,
    solver: str = DEFAULT_SOLVER,
    dtype: str = "float32",
    device: str = "auto",
    batch_size: int = 16,
    block_samples: int = 32,
    run_seed: int = 0,
    feature_extractor: str = "auto",
    storage_options: dict[str, Any] | None = None,
    thumbnail_sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Self-loop degradation study (the deployable entry point): plain parameters, mapped to a
    :class:`LoopJob` exactly as the CLI's options are."""
    job = LoopJob.from_options(
        source=source, out=out, weights=weights, vae=vae, spec=spec, iterations=iterations,
        seed_policy=seed_policy, controls=controls, inject_p=inject_p, carry=carry, joint=joint,
        patches=patches, cells=cells, reference_cells=reference_cells, steps=steps, solver=solver,
        dtype=dtype, device=device, batch_size=batch_size, block_samples=block_samples, run_seed=run_seed,
        feature_extractor=feature_extractor, storage_options=storage_options,
        thumbnail_sizes=thumbnail_sizes)
    return run_on_cluster("loop-study-blocks", run_loop_study, job, cluster, workers, artifact="loop-study",
                          count="samples")


__all__ = ["LoopError", "loop_study_flow", "parse_controls", "run_loop_study"]
