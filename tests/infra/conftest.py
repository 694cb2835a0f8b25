"""Fixtures for the production paths: a real single-node Slurm (tests/infra/local_slurm.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from local_slurm import local_slurm, why_not  # noqa: E402

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Environment for Slurm clients of a local slurmctld + slurmd. Skipped where it cannot start (not
    installed, not root); under CI=true that is a failure (.ci/run installs it)."""
    reason = why_not()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"local Slurm unavailable in CI: {reason}")
        pytest.skip(f"local Slurm unavailable: {reason}")
    with local_slurm(tmp_path_factory.mktemp("slurm")) as env:
        yield env
