"""End-to-end ``complete`` throughput against raw generation on the same model, steps and batch size.

Both run in this one script on the same machine: the raw loop calls ``CopGen.generate`` on samples already
in memory (no I/O, no orchestration); the pipeline runs the real flow (Prefect API, Dask LocalCluster of
worker processes, parquet reads, cube writes, ledger, provenance tables). The ratio shows what the
orchestration costs once the per-sample model cost dominates (goal: pipeline >= 0.9 x raw).

    python benchmarks/pipeline.py [--cells 96] [--steps 20] [--batch-size 16] [--workers N]
                                  [--block-samples N] [--model bundled|tiny|release] [--device cpu|cuda]
                                  [--repeats 1]

The default cluster is the CLI's (``--cluster local``: min(4, cores) worker processes, the cores shared
out as torch threads); ``--block-samples`` defaults to cells / workers rounded up to a whole batch, so
every worker gets one block (fewer blocks than workers leave cores idle; uneven blocks leave one waiting
for the last). Prints, per repeat, raw and pipeline samples/s and their ratio, the workers' seconds
per stage (read, encode, sample, decode, write, idle = waiting on the I/O thread, load, finish), where
the pipeline's wall time went (``wall_s``: Prefect's flow-run start and end, the driver's plan, the wait
for the first block to start in a worker, the blocks, the summary after the last one) and CPU-seconds
per sample on both sides (``cpu_s_per_sample``: this process for raw; the workers and this driver for the
pipeline), which a loaded machine distorts far less than wall time. Repeat 0 runs on freshly started
workers (they import torch and load the model during the run), later repeats on warm ones (a long-lived
cluster).
``--model release`` is the release-size network with random weights (speed only; GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "warning")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _model_files(kind: str, tmp: Path) -> tuple[str, str, int]:
    if kind == "bundled":
        from copgen import bundled

        net, vae = bundled.paths()
        return net, vae, 384
    import torch
    from copgen.autoencoder import AutoencoderKL
    from copgen.model import RELEASE_CONFIG, Triffuser
    from copgen.storage.checkpoint_files import save_checkpoint

    torch.manual_seed(0)
    if kind == "release":  # release-size network and SD autoencoder, random weights (speed only)
        save_checkpoint(Triffuser(**RELEASE_CONFIG).state_dict(), tmp / "net.safetensors", RELEASE_CONFIG)
        ae = AutoencoderKL.release()
        save_checkpoint(ae.state_dict(), tmp / "ae.safetensors", ae.config)
        return str(tmp / "net.safetensors"), str(tmp / "ae.safetensors"), 384
    cfg = dict(img_size=8, in_chans=4, patch_size=2, embed_dim=192, depth=8, num_heads=3, mlp_ratio=4,
               qkv_bias=False, num_modalities=4)
    save_checkpoint(Triffuser(**cfg).state_dict(), tmp / "net.safetensors", cfg)
    ae = AutoencoderKL(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=2, z_channels=4, embed_dim=4,
                       resolution=64)
    save_checkpoint(ae.state_dict(), tmp / "ae.safetensors", ae.config)
    return str(tmp / "net.safetensors"), str(tmp / "ae.safetensors"), 384


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=96, help="cells in the synthetic source (rows x 8)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="Dask worker processes (default: the CLI's)")
    ap.add_argument("--block-samples", type=int, default=None)
    ap.add_argument("--model", choices=["bundled", "tiny", "release"], default="bundled")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=1, help="raw + pipeline pairs, each in a fresh output")
    args = ap.parse_args()

    import numpy as np
    import psutil
    import torch
    from copgen.flows.clusters import open_cluster, parse_cluster, task_runner
    from copgen.flows.complete import run_complete
    from copgen.flows.demo import write_demo_world
    from copgen.flows.jobs import CompleteJob, OutputLayout, SourceSpec
    from copgen.flows.models import ModelSpec, get_copgen, sample_size
    from copgen.flows.prefect_api import prefect_api
    from copgen.modalities import Modality
    from copgen.storage.majortom.thumbnails import to_samples
    from distributed import Client
    from prefect import flow

    tmp = Path(tempfile.mkdtemp(prefix="copgen-bench-"))
    net, vae, thumb = _model_files(args.model, tmp)
    rows = max(1, args.cells // 8)
    # Every cell misses S1RTC: the pipeline generates exactly one modality per cell, like the raw loop.
    meta = write_demo_world(str(tmp / "world"), seed=1, rows=rows, cols=8, origin=(45.0, 7.0),
                            thumbnail_size=thumb, missing={"S1RTC": 1.0}, cloud_prob=0.2)
    source = SourceSpec(root=str(tmp / "world"), thumbnail_sizes=meta["thumbnail_sizes"])
    model = ModelSpec(weights=net, vae=vae, device=args.device, dtype=args.dtype, steps=args.steps,
                      solver="2m", batch_size=args.batch_size)

    # Raw: generation only, on the same conditions, in the same batch size, in this process.
    copgen = get_copgen(model)
    size = sample_size(copgen)
    reader = source.open()
    pairs = reader.pair().pairs
    conds = {}
    for m in (Modality.DEM, Modality.S2L1C, Modality.S2L2A):
        samples = reader.read_samples(reader.refs(pairs, m)).samples
        conds[m] = np.stack([to_samples(s.thumbnail, m, "center", size, dem_scale=3)[0] for s in samples])
    n = len(pairs)

    me = psutil.Process()

    def cpu_s(p) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def raw() -> tuple[float, float]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), cpu_s(me)
        copgen.generate(conds, [Modality.S1RTC], list(range(n)))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, cpu_s(me) - c0

    def worker_cpu(client) -> float:
        return sum(client.run(lambda: cpu_s(psutil.Process())).values())

    spec = parse_cluster("local", n_workers=args.workers)
    workers = spec.n_workers or max(1, min(4, os.cpu_count() or 2))  # what open_cluster starts
    per_worker = -(-n // workers)
    block = args.block_samples or -(-per_worker // args.batch_size) * args.batch_size
    print(f"{args.model} model on {args.device} ({args.dtype}), {n} samples, 2m-{args.steps}, batch "
          f"{args.batch_size}; {workers} worker processes, blocks of {block}; raw: {torch.get_num_threads()} "
          f"torch threads in one process; load average {os.getloadavg()[0]:.1f}", flush=True)
    # Pipeline: the real flow on a LocalCluster (startup of the API and the cluster excluded, reported).
    with prefect_api():
        t_c = time.perf_counter()
        with open_cluster(spec) as (address, _), Client(address) as client:
            startup = time.perf_counter() - t_c
            body = flow(name="bench-complete", task_runner=task_runner(address))(run_complete)
            for rep in range(args.repeats):
                raw_s, raw_cpu = raw()
                job = CompleteJob(source=source, out=OutputLayout(str(tmp / f"out{rep}")), model=model,
                                  block_samples=block)
                w0, c0 = worker_cpu(client), cpu_s(me)
                t1 = time.perf_counter()
                summary = body(job, address=address)
                pipe_s = time.perf_counter() - t1
                pipe_cpu = worker_cpu(client) - w0 + cpu_s(me) - c0
                assert summary["samples_done"] == n, summary
                threads = sorted(client.run(lambda: __import__("torch").get_num_threads()).values())
                tl = summary["timeline_s"]
                wall = {  # the pipeline's wall time, in order
                    "flow_run_start_and_end": pipe_s - tl["summarised"],
                    "driver_plan": tl["planned"],
                    "until_first_block_starts": tl["first_block_started"] - tl["planned"],
                    "blocks": tl["last_block_ended"] - tl["first_block_started"],
                    "summary_after_last_block": tl["summarised"] - tl["last_block_ended"],
                }
                result = {
                    "repeat": rep, "model": args.model, "device": args.device, "samples": n,
                    "steps": args.steps, "batch_size": args.batch_size, "workers": workers,
                    "block_samples": block, "cpu_count": os.cpu_count(),
                    "raw_generate_samples_per_s": round(n / raw_s, 3),
                    "pipeline_samples_per_s": round(n / pipe_s, 3),
                    "ratio_pipeline_over_raw": round(raw_s / pipe_s, 3),
                    "workers_state": "fresh" if rep == 0 else "warm",
                    "cluster_startup_s": round(startup, 1),
                    "raw_s": round(raw_s, 1),
                    "pipeline_s": round(pipe_s, 1),
                    "wall_s": {k: round(v, 2) for k, v in wall.items()},
                    "worker_stage_seconds": summary.get("stage_seconds"),
                    "cpu_s_per_sample": {"raw": round(raw_cpu / n, 3), "pipeline": round(pipe_cpu / n, 3)},
                    "torch_threads": {"raw": torch.get_num_threads(), "workers": threads},
                    "load_average": round(os.getloadavg()[0], 1),
                }
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
