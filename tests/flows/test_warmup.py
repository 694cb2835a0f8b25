"""Worker warm-up (flows/warmup.py): every worker of a real cluster imports the block code and loads the
run's model before its first block; GPU clusters warm only their GPU workers; a bad checkpoint is left
for the run itself to report."""

from __future__ import annotations

import asyncio

from copgen.flows.clusters import open_cluster, parse_cluster
from copgen.flows.models import ModelSpec
from copgen.flows.warmup import warm_workers
from distributed import Client, LocalCluster, Worker


def _cached(key: str) -> bool:
    import sys

    models = sys.modules.get("copgen.flows.models")
    return models is not None and key in models._CACHE and "copgen.flows.blocks" in sys.modules


def test_every_worker_process_loads_the_model(tiny_model):
    net, vae = tiny_model
    spec = ModelSpec(weights=net, vae=vae, device="cpu", steps=2, solver="2m", batch_size=4)
    with open_cluster(parse_cluster("local", n_workers=2)) as (address, _), Client(address) as c:
        c.wait_for_workers(2, timeout=120)
        with warm_workers(address, spec) as futures:
            assert [f.result(timeout=300) for f in futures] == ["ok", "ok"]
        loaded = c.run(_cached, spec.key())
    assert sorted(loaded.values()) == [True, True], loaded


def test_only_gpu_workers_are_warmed_and_failures_stay_quiet(tmp_path):
    # In-process workers (one declaring GPU=1, as dask-cuda's do) to see where each warm-up ran.
    bad = ModelSpec(weights=str(tmp_path / "missing.safetensors"), vae=str(tmp_path / "no-vae.safetensors"),
                    device="cpu")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster:
        async def add(**kw):
            return await Worker(cluster.scheduler_address, nthreads=1, **kw)

        gpu = cluster.sync(add, resources={"GPU": 1})
        cpu = cluster.sync(add)
        try:
            with Client(cluster.scheduler_address, timeout="30s") as client:
                client.wait_for_workers(2, timeout=60)
                with warm_workers(cluster.scheduler_address, bad) as futures:
                    reasons = [f.result(timeout=120) for f in futures]
                    where = client.who_has(futures)
            assert len(reasons) == 1 and reasons[0] != "ok" and "missing.safetensors" in reasons[0], reasons
            assert [w for ws in where.values() for w in ws] == [gpu.address]
        finally:
            for w in (gpu, cpu):
                cluster.sync(lambda w=w: asyncio.wait_for(w.close(), 30))


def test_no_cluster_no_warm_up(tiny_model):
    net, vae = tiny_model
    with warm_workers(None, ModelSpec(weights=net, vae=vae)) as futures:
        assert futures == []
