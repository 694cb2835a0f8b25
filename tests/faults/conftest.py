"""The fault suite reuses the flow tests' real parts (one Prefect API, a two-worker Dask LocalCluster, the
tiny model, the tiny synthetic world): loaded from tests/flows/conftest.py so both suites share them."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_copgen_flow_fixtures",
                                               Path(__file__).parents[1] / "flows" / "conftest.py")
_flows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_flows)

prefect_api = _flows.prefect_api
dask_address = _flows.dask_address
tiny_model = _flows.tiny_model
tiny_world = _flows.tiny_world
corrupt_world = _flows.corrupt_world
model = _flows.model
source = _flows.source
on_cluster = _flows.on_cluster


@pytest.fixture
def world_copy(tiny_world, tmp_path):
    """A private copy of the tiny world that a test may damage; returns (root, meta)."""
    root, meta = tiny_world
    dst = tmp_path / "world"
    shutil.copytree(root, dst)
    return str(dst), meta


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to show that something was left untouched)."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sample_keys(cube) -> list[tuple[str, str, int]]:
    g = cube.group
    return list(zip((str(c) for c in g["grid_cell"][:]), (str(p) for p in g["patch"][:]),
                    (int(v) for v in g["variant"][:]), strict=True))
