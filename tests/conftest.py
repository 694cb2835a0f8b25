"""Shared fixtures: the reference vectors in ../shared and a real S3-compatible server on loopback."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COPGEN_SHARED", REPO.parent / "shared"))

# torch.compile's on-disk kernel cache does not tell CPU kernel levels apart: kernels compiled natively
# (AVX-512) and reused under ATEN_CPU_CAPABILITY=avx2 returned NaN (torch 2.13). One cache per level.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile

    _level = os.environ.get("ATEN_CPU_CAPABILITY", "native").lower() or "native"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(
        Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}_{_level}"
    )


def _require(path: Path) -> Path:
    if path.exists():
        return path
    msg = f"reference data missing: {path} (expected ../shared beside the checkout, or set COPGEN_SHARED)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)  # CI has ../shared: its absence is a failure, never a skip
    pytest.skip(msg)


def pytest_report_header(config) -> str:
    """The CPU kernel levels in use: float results differ in their last bits between levels."""
    import numpy as np
    import torch

    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    umath = getattr(np, "_core", None) or np.core  # numpy 2 / 1.26
    umath = umath._multiarray_umath
    numpy_levels = [t for t in umath.__cpu_dispatch__ if umath.__cpu_features__.get(t)]
    return (
        f"torch {torch.__version__} CPU capability {torch.backends.cpu.get_cpu_capability()}"
        f"{f' (forced by ATEN_CPU_CAPABILITY={forced})' if forced else ''}; numpy {np.__version__} "
        f"dispatch {' '.join(numpy_levels) or 'baseline only'} (see tests/tolerances.py)"
    )


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/reference``: skipped in a user's clone without it, a failure when CI=true."""
    return _require(SHARED / "reference")


@pytest.fixture(scope="session")
def real_dir(reference_dir: Path) -> Path:
    return _require(reference_dir / "real")


class S3Server:
    """A moto S3 server on 127.0.0.1 (a real HTTP endpoint; subprocesses and Dask workers reach it too)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        self.storage_options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def new_bucket(self, prefix: str = "copgen") -> str:
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=name)
        return name

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """One S3 server for the test session; tests isolate themselves with ``s3_server.new_bucket()``."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = S3Server()
    yield server
    server.stop()


# ---- the flow tests' real parts (shared by tests/flows and tests/faults: one Prefect API, one cluster) ----
# One Prefect API for the session (pinned URL), a Dask LocalCluster of two worker processes, a tiny
# random-weight model saved as real checkpoint files, and a small synthetic world written in the published
# Major TOM layout (some modalities missing).

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
    import torch
    from copgen.autoencoder import AutoencoderKL
    from copgen.model import Triffuser
    from copgen.storage.checkpoint_files import save_checkpoint

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
