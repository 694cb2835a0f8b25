"""Shared fixtures: the reference vectors in ../shared and a real S3-compatible server on loopback."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COPGEN_SHARED", REPO.parent / "shared"))


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
