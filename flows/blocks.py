"""Worker side: one work block of samples, read → preprocess → encode → sample → decode → write → mark.

These are plain functions of ``copgen`` + ``storage`` (the flows wrap them in Prefect tasks), so
they run and test without Prefect or Dask. A block is written completely (arrays, ``done`` flags, table
parts) before its ledger marker; re-running a block rewrites the same bytes (per-sample seeds, fixed
network batch size), so a crash anywhere loses nothing and a resume redoes only unmarked blocks.

Bad inputs never fail a block: a sample whose thumbnail cannot be read or cut is quarantined (recorded
in the ledger with the cell, modality, file and reason; ``done`` stays 0) and the rest is written.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from copgen import seeds as seeding
from copgen.flows.jobs import OutputLayout, RunInfo, SourceSpec, patch_arg
from copgen.flows.models import get_copgen
from copgen.loop import LoopConfig, run_loop
from copgen.metrics import paired_metric_functions
from copgen.modalities import Modality
from copgen.records import BlockPlan, Origin, SamplePlan
from copgen.storage import tables
from copgen.storage.cubes import BlockData, Cube
from copgen.storage.ledger import Ledger, QuarantineRecord
from copgen.storage.majortom.thumbnails import ThumbnailError, to_samples

_READERS: dict[str, Any] = {}


def _reader(source: SourceSpec):
    """One reader per worker process and source (it keeps part files open between blocks)."""
    key = json.dumps(asdict(source), sort_keys=True, default=str)
    reader = _READERS.get(key)
    if reader is None:
        _READERS.clear()
        reader = _READERS[key] = source.open(on_error="skip")
    return reader


@dataclass
class _Inputs:
    images: dict[Modality, np.ndarray]  # (n, S, S, 3) per modality; zeros where absent or bad
    have: dict[Modality, np.ndarray]  # bool (n,) per modality: a usable real sample
    bad: dict[int, list[QuarantineRecord]]  # row -> why it is quarantined


def read_block_inputs(
    source: SourceSpec, samples: Sequence[SamplePlan], modalities: Sequence[Modality], size: int, run_id: str,
    block_id: str,
) -> _Inputs:
    """Fetch each needed (cell, modality) thumbnail once and cut the samples' patches from it."""
    reader = _reader(source)
    n = len(samples)
    images = {m: np.zeros((n, size, size, 3), np.uint8) for m in modalities}
    have = {m: np.zeros(n, bool) for m in modalities}
    bad: dict[int, list[QuarantineRecord]] = defaultdict(list)

    def quarantine(i: int, m: Modality, file: str, reason: str) -> None:
        key = samples[i].key
        bad[i].append(QuarantineRecord(grid_cell=key.grid_cell, patch=key.patch, modality=m.name,
                                       file=str(file), reason=reason, run_id=run_id, block_id=block_id))

    for m in modalities:
        refs = {i: r for i, s in enumerate(samples) if (r := s.source(m)) is not None}
        if not refs:
            continue
        per_cell = list({r.grid_cell: r for r in refs.values()}.values())  # one fetch per cell
        fetched = reader.read_samples(per_cell, on_error="skip")
        thumbs = {s.grid_cell: s.thumbnail for s in fetched.samples}
        reasons = {b.grid_cell: b for b in fetched.bad}
        for i, ref in refs.items():
            cell, patch = ref.grid_cell, samples[i].key.patch
            if cell in reasons:
                b = reasons[cell]
                where = f"{b.dataset} row group {b.row_group} field {b.field}"
                quarantine(i, m, b.file or "", f"{where}: {b.reason}")
                continue
            try:
                # GeoTIFF tiles (storage/majortom/tiles_folder.py) hold every modality on one grid: no
                # Major TOM DEM upsampling for them
                dem_scale = None if samples[i].tile is not None else 3
                images[m][i] = to_samples(thumbs[cell], m, patch_arg(patch), size, dem_scale=dem_scale,
                                          context={"dataset": m.dataset, "cell": cell})[0]
                have[m][i] = True
            except (ThumbnailError, ValueError) as exc:
                quarantine(i, m, ref.file, f"cannot cut patch {patch}: {exc}")
    return _Inputs(images, have, dict(bad))


def _finish(out: OutputLayout, cube: Cube, plan: BlockPlan, data: BlockData, run_id: str, inputs: _Inputs,
            provenance: list[dict], metrics: list[dict] | None, t0: float, rows_written: int = 0,
            ) -> dict[str, Any]:
    """Write the block's arrays (the rows after ``rows_written``; ``done`` last), table parts and
    quarantine records, then (last) its marker."""
    block = plan.block
    digests = cube.write_block(block, data, rows_written)
    # One part per (cube, block): the conditions of a loop study share block ids and the run's tables.
    part = f"{cube.url.rstrip('/').rsplit('/', 1)[-1].removesuffix('.zarr')}-{block.id}"
    # block_part: a redo under any run id replaces the block's parts (exactly once; storage/tables.py)
    tables.write_provenance(out.provenance, run_id, part, provenance, out.storage_options, block_part=True)
    if metrics is not None:
        tables.write_metrics(out.metrics, run_id, part, metrics, out.storage_options, block_part=True)
    ledger = Ledger(cube.url, out.storage_options)
    for records in inputs.bad.values():
        for rec in records:
            ledger.quarantine(rec)
    n_done = int(np.asarray(data.done).sum())
    ledger.mark_done(block, run_id, digests, n_done, extra={"seconds": round(time.perf_counter() - t0, 3)})
    return {"block": block.id, "samples": block.size, "done": n_done, "quarantined": block.size - n_done,
            "seconds": time.perf_counter() - t0}


def _provenance_row(info: RunInfo, plan: BlockPlan, i: int, k: int, m: Modality, o: Origin,
                    conditioned_on: list[str] | None, seed: int | None, **extra: Any) -> dict[str, Any]:
    """One provenance row (DESIGN "Provenance"): block sample ``i``, iteration ``k``, modality ``m``."""
    sample = plan.samples[i]
    ref = sample.source(m) if o is Origin.REAL else None
    product = {"product_id": ref.product_id, "product_time": ref.timestamp} if ref is not None else {}
    return {
        "grid_cell": sample.key.grid_cell, "patch": sample.key.patch, "sample": plan.index(i),
        "iteration": k, "modality": m.name, "origin": o.label,
        "conditioned_on": conditioned_on if o is Origin.GENERATED else None, **product, **extra,
        "seed": seed if o is Origin.GENERATED else None,
        "sampler": info.model.solver, "steps": info.model.steps,
        "network_sha256": info.network_sha256, "autoencoder_sha256": info.autoencoder_sha256,
        "package_version": info.package_version, "synthetic": info.synthetic,
    }


def _quarantine_all(inputs: _Inputs, plan: BlockPlan, i: int, reason: str, info: RunInfo) -> None:
    key = plan.samples[i].key
    inputs.bad.setdefault(i, []).append(QuarantineRecord(
        grid_cell=key.grid_cell, patch=key.patch, modality="*", file="", reason=reason, run_id=info.run_id,
        block_id=plan.block.id))


# ---- dataset completion -------------------------------------------------------------------------------


class StageClock:
    """Seconds per stage of one block (read, encode, sample, decode, write, idle, load, finish) and, for
    tests, the order of stage events ``(stage, item, "start"|"end")`` across the pipeline's threads."""

    def __init__(self, trace: Callable[[str, Any, str], None] | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._trace = trace
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str, item: Any = None) -> Iterator[None]:
        if self._trace is not None:
            self._trace(name, item, "start")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[name] += time.perf_counter() - t0
            if self._trace is not None:
                self._trace(name, item, "end")


class _Behind:
    """One I/O thread beside the model: it reads (and decodes) the next micro-batch's inputs ahead and
    writes finished rows behind, while the caller's thread generates. Waiting on it counts as idle."""

    def __init__(self, clock: StageClock) -> None:
        self.clock = clock
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="copgen-block-io")
        self._writes: list[Future] = []

    def submit(self, stage: str, item: Any, fn: Callable[..., Any], *args: Any) -> Future:
        def run():
            with self.clock.stage(stage, item):
                return fn(*args)
        fut = self._pool.submit(run)
        if stage == "write":
            self._writes.append(fut)
        return fut

    def wait(self, fut: Future) -> Any:
        if not fut.done():
            with self.clock.stage("idle"):
                return fut.result()
        return fut.result()

    def drain(self) -> None:
        for fut in self._writes:
            self.wait(fut)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def complete_block(
    info: RunInfo, source: SourceSpec, out: OutputLayout, cube_url: str, plan: BlockPlan,
    trace: Callable[[str, Any, str], None] | None = None,
) -> dict[str, Any]:
    """Fill the missing modalities of one block. Iteration 0 holds the inputs as read (real or absent),
    iteration 1 the completed state (real carried over, targets generated from every real modality).

    A pipeline (:class:`_Behind`): the rows are read in micro-batches of the model's batch size, one
    micro-batch ahead of the model, on an I/O thread; samples wait per (conditions, targets) group until
    a full network batch is there (so each group is generated in the same padded batches as if the block
    were read at once: the same bytes); finished rows are written behind, shard by shard, on the same
    thread; ``done`` flags, tables and the ledger marker follow once all data is stored. ``trace``
    receives every stage event (tests check the overlap by event order).

    Long on purpose: the arrays, the waiting groups and the I/O thread are one pipeline's state, shared by
    its three small closures (read, generate, write behind) and the one loop that drives them; spread over
    methods, the order of reads, generations and writes, which the same-bytes guarantee rests on, would no
    longer read top to bottom."""
    t0, started_at = time.perf_counter(), time.time()
    clock = StageClock(trace)
    block, rows = plan.block, plan.samples
    cube = Cube.open(cube_url, out.storage_options)
    with clock.stage("load"):
        copgen = get_copgen(info.model)
    size, n, mods = info.sample_size, len(rows), cube.spec.modalities
    batch = copgen.batch_size or max(n, 1)
    shard = cube.spec.shard_samples

    images = {m: np.zeros((n, 2, size, size, 3), np.uint8) for m in mods}
    origin = np.zeros((n, 2, len(mods)), np.uint8)
    want_latents = cube.spec.latent_shape is not None
    latents = np.zeros((n, 2, len(mods), *cube.spec.latent_shape), np.float16) if want_latents else None
    bad = np.zeros(n, bool)
    data = BlockData(keys=plan.keys, images=images, origin=origin, latents=latents, done=~bad)
    seeds = [seeding.sample_seed(info.run_seed, s.key.grid_cell, s.key.patch, 1, f"variant{s.key.variant}")
             for s in rows]
    inputs = _Inputs({m: np.zeros((n, size, size, 3), np.uint8) for m in mods},
                     {m: np.zeros(n, bool) for m in mods}, {})
    conditioned_on: dict[int, list[str]] = {}
    finished = np.zeros(n, bool)
    groups: dict[tuple, list[int]] = defaultdict(list)
    io = _Behind(clock)
    rows_written = 0

    def read(a: int, b: int) -> _Inputs:
        return read_block_inputs(source, rows[a:b], mods, size, info.run_id, block.id)

    def generate(conds: tuple[Modality, ...], targets: tuple[Modality, ...], idx: list[int]) -> None:
        item = (idx[0], len(idx))
        cond_imgs = {m: inputs.images[m][idx] for m in conds}
        s = [seeds[i] for i in idx]
        with clock.stage("encode", item):
            cond_lat = copgen.encode(cond_imgs, s)
        with clock.stage("sample", item):
            gen_lat = copgen.generate_latents(cond_lat, list(targets), s)
        with clock.stage("decode", item):
            out_imgs = copgen.decode(gen_lat)
        out_lat = {**cond_lat, **gen_lat}
        for j, m in enumerate(mods):
            if m in targets:
                images[m][idx, 1] = out_imgs[m]
                origin[idx, 1, j] = Origin.GENERATED
            if want_latents and m in out_lat:
                latents[idx, 0 if m in conds else 1, j] = out_lat[m].numpy().astype(np.float16)
        for i in idx:
            conditioned_on[i] = [m.name for m in conds]
        finished[idx] = True

    def write_behind() -> None:
        """Hand the longest run of finished rows that ends on a shard boundary to the I/O thread."""
        nonlocal rows_written
        upto = n if finished.all() else int(np.argmin(finished))
        if upto < n:
            upto -= upto % shard
        if upto <= rows_written:
            return
        io.submit("write", (rows_written, upto), cube.write_rows, block, data, rows_written, upto)
        rows_written = upto

    try:
        chunks = [(a, min(a + batch, n)) for a in range(0, n, batch)]
        ahead = io.submit("read", 0, read, *chunks[0]) if chunks else None
        for k, (a, b) in enumerate(chunks):
            part = io.wait(ahead)
            if k + 1 < len(chunks):  # the next micro-batch is read while this one is generated
                ahead = io.submit("read", k + 1, read, *chunks[k + 1])
            for m in mods:
                inputs.images[m][a:b] = part.images[m]
                inputs.have[m][a:b] = part.have[m]
            for i_part, records in part.bad.items():
                inputs.bad[a + i_part] = records
            for i in range(a, b):
                _place_row(i, mods, plan, inputs, images, origin, bad, groups, finished, info)
            for key, idx in list(groups.items()):  # full network batches only; the rest waits
                while len(idx) >= batch:
                    generate(*key, idx[:batch])
                    del idx[:batch]
            write_behind()
        for key, idx in groups.items():  # the groups' last, padded batches
            if idx:
                generate(*key, idx)
        data.done = ~bad
        write_behind()
        io.drain()
    finally:
        io.close()

    prov = [_provenance_row(info, plan, i, k, m, Origin(int(origin[i, k, j])), conditioned_on.get(i),
                            seeds[i]) for i in range(n) for k in (0, 1) for j, m in enumerate(mods)]
    with clock.stage("finish"):
        result = _finish(out, cube, plan, data, info.run_id, inputs, prov, None, t0, rows_written)
    return {**result, "stages": dict(clock.seconds), "started_at": started_at, "ended_at": time.time()}


def _place_row(i: int, mods, plan: BlockPlan, inputs: _Inputs, images, origin, bad, groups, finished,
               info: RunInfo) -> None:
    """Sample ``i`` once read: real inputs into iteration 0 (and carried into 1 unless a target), then
    either finished (quarantined, or nothing to generate) or queued in its (conditions, targets) group."""
    targets = plan.samples[i].targets
    if i in inputs.bad:  # quarantined: stays empty and not done
        bad[i] = finished[i] = True
        return
    conds = tuple(m for m in mods if inputs.have[m][i] and m not in targets)
    if targets and not conds:  # nothing real to condition on: generating would be unconditional
        _quarantine_all(inputs, plan, i, "no usable real modality to condition on", info)
        bad[i] = finished[i] = True
        return
    for j, m in enumerate(mods):
        if inputs.have[m][i]:
            images[m][i, 0] = inputs.images[m][i]
            origin[i, 0, j] = Origin.REAL
            if m not in targets:  # carried into the completed state unchanged
                images[m][i, 1] = inputs.images[m][i]
                origin[i, 1, j] = Origin.REAL
    if targets:
        groups[(conds, targets)].append(i)
    else:
        finished[i] = True


# ---- the self-loop study ------------------------------------------------------------------------------


def loop_block(info: RunInfo, source: SourceSpec, out: OutputLayout, cube_url: str, plan: BlockPlan,
               config: LoopConfig) -> dict[str, Any]:
    """Run the loop on one block of complete cells; write every iteration and per-sample paired metrics
    (vs the real image of the sample, and vs that modality's previous generation)."""
    t0 = time.perf_counter()
    cube = Cube.open(cube_url, out.storage_options)
    size, n, mods = info.sample_size, len(plan.samples), cube.spec.modalities
    K = cube.spec.iterations - 1
    inputs = read_block_inputs(source, plan.samples, mods, size, info.run_id, plan.block.id)
    needed = config.spec.modalities
    ok = np.array([i not in inputs.bad and all(inputs.have[m][i] for m in needed) for i in range(n)], bool)
    for i in np.flatnonzero(~ok):
        if i not in inputs.bad:
            _quarantine_all(inputs, plan, i, "a modality of the loop spec is missing", info)

    images = {m: np.zeros((n, K + 1, size, size, 3), np.uint8) for m in mods}
    origin = np.zeros((n, K + 1, len(mods)), np.uint8)
    metrics: list[dict] = []
    idx = np.flatnonzero(ok)
    keys = [(plan.samples[i].key.grid_cell, plan.samples[i].key.patch) for i in idx]
    seeds_by_k: dict[int, list[int]] = {}
    sources: dict[int, Modality | None] = {}
    if len(idx):
        real = {m: inputs.images[m][idx] for m in mods if inputs.have[m][idx].all()}
        previous: dict[Modality, np.ndarray] = {}
        for it in run_loop(get_copgen(info.model), real, keys, config):
            for j, m in enumerate(mods):
                origin[idx, it.k, j] = it.origin[m]
                if m in it.images:
                    images[m][idx, it.k] = it.images[m]
            seeds_by_k[it.k], sources[it.k] = it.seeds, it.source
            if it.k == 0:
                previous = dict(real)
                continue
            for m, gen in it.images.items():
                metrics += _paired_rows(m, gen, real[m], "real", it.k, idx, plan, config, info)
                metrics += _paired_rows(m, gen, previous[m], "previous", it.k, idx, plan, config, info)
                previous[m] = gen
    data = BlockData(keys=plan.keys, images=images, origin=origin, done=ok)

    prov = []
    for i_pos, i in enumerate(idx):
        for k in range(K + 1):
            for j, m in enumerate(mods):
                o = Origin(int(origin[i, k, j]))
                if o is not Origin.ABSENT:
                    prov.append(_provenance_row(
                        info, plan, i, k, m, o, [sources[k].name] if o is Origin.GENERATED else None,
                        seeds_by_k[k][i_pos] if k else None, loop_spec=str(config.spec)))
    return _finish(out, cube, plan, data, info.run_id, inputs, prov, metrics, t0)


def metric_context(config: LoopConfig, info: RunInfo) -> dict[str, Any]:
    """Columns every metrics row of a loop condition carries."""
    return {"condition": config.label, "loop_spec": str(config.spec), "seed_policy": config.seed_policy.value,
            "steps": info.model.steps, "sampler": info.model.solver}


def _paired_rows(m: Modality, gen: np.ndarray, other: np.ndarray, comparison: str, k: int, idx,
                 plan: BlockPlan, config: LoopConfig, info: RunInfo) -> list[dict]:
    ctx = metric_context(config, info)
    out = []
    for name, fn in paired_metric_functions(m, gen.shape[1:]).items():
        values = np.asarray(fn(gen, other), dtype=float)
        for v, i in zip(values, idx, strict=True):
            key = plan.samples[i].key
            out.append({**ctx, "iteration": k, "modality": m.name, "metric": name, "comparison": comparison,
                        "value": float(v), "n": 1, "grid_cell": key.grid_cell, "patch": key.patch,
                        "sample": plan.index(i)})
    return out
