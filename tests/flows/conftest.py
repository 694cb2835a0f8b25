"""Real parts for the flow tests: one Prefect API for the session (pinned URL), a Dask LocalCluster of two
worker processes, a tiny random-weight model saved as real checkpoint files, and a small synthetic world
written in the published Major TOM layout (some modalities missing)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "warning")

TINY_NET = dict(img_size=4, in_chans=4, patch_size=2, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                qkv_bias=False, num_modalities=4)
TINY_AE = dict(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, z_channels=4, embed_dim=4, resolution=32)
WORLD = dict(seed=5, rows=4, cols=3, origin=(46.0, 8.0), thumbnail_size=192,
             missing={"S1RTC": 0.3, "DEM": 0.25}, cloud_prob=0.2)


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect server for the whole session, its URL pinned for every process."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url  # worker processes spawned later inherit it
        yield url
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


@pytest.fixture(scope="session")
def dask_address(prefect_api):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from copgen.autoencoder import AutoencoderKL
    from copgen.checkpoints import save_checkpoint
    from copgen.model import Triffuser

    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net = Triffuser(**TINY_NET)
    ae = AutoencoderKL(**TINY_AE)
    save_checkpoint(net.state_dict(), d / "network.safetensors", TINY_NET)
    save_checkpoint(ae.state_dict(), d / "autoencoder.safetensors", ae.config)
    return str(d / "network.safetensors"), str(d / "autoencoder.safetensors")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    from copgen.flows.demo import write_demo_world

    root = str(tmp_path_factory.mktemp("world") / "world")
    meta = write_demo_world(root, **WORLD)
    return root, meta


@pytest.fixture(scope="session")
def corrupt_world(tiny_world, tmp_path_factory):
    """A copy of the tiny world whose S2L2A thumbnail of one incomplete cell is garbage bytes (same file,
    same row group). Returns (root, meta, the corrupted cell, the part file's name)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from copgen.modalities import Modality
    from copgen.storage.majortom.reader import MajorTomReader

    root, meta = tiny_world
    broken = tmp_path_factory.mktemp("broken") / "world"
    shutil.copytree(root, broken)
    pairs = MajorTomReader(root, thumbnail_sizes={m: None for m in Modality}).pair().pairs
    incomplete = set(pairs.grid_cell[~pairs.complete])
    part = sorted((broken / "Core-S2L2A" / "images").glob("part_*.parquet"))[0]
    table = pq.read_table(part)
    cells = table.column("grid_cell").to_pylist()
    victim = next(i for i, c in enumerate(cells) if c in incomplete)
    thumbs = table.column("thumbnail").to_pylist()
    thumbs[victim] = b"\x89PNG\r\n\x1a\n this is not an image"
    column = pa.array(thumbs, type=table.schema.field("thumbnail").type)
    pq.write_table(table.set_column(table.schema.get_field_index("thumbnail"), "thumbnail", column), part,
                   row_group_size=1)
    return str(broken), meta, cells[victim], part.name


@pytest.fixture(scope="session")
def model(tiny_model):
    from copgen.flows.models import ModelSpec

    net, vae = tiny_model
    return ModelSpec(weights=net, vae=vae, steps=3, solver="2m", batch_size=4)


@pytest.fixture(scope="session")
def source(tiny_world):
    from copgen.flows.jobs import SourceSpec

    root, meta = tiny_world
    return SourceSpec(root=root, thumbnail_sizes=meta["thumbnail_sizes"])


@pytest.fixture(scope="session")
def on_cluster(dask_address):
    """Run a flow body (``run_complete``, ``run_loop_study``) as a Prefect flow with the Dask task runner
    over the session's LocalCluster."""
    from copgen.flows.clusters import task_runner
    from prefect import flow

    def run(body, **kwargs):
        return flow(name=body.__name__, task_runner=task_runner(dask_address))(body)(
            address=dask_address, **kwargs)

    return run
