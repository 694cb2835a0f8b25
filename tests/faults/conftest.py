"""The fault suite reuses the flow tests' real parts from tests/conftest.py (one Prefect API, a two-worker
Dask LocalCluster, the tiny model, the tiny synthetic world: the same session instances as tests/flows)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


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
