"""The fault suite reuses the flow tests' real parts from tests/conftest.py (one Prefect API, a two-worker
Dask LocalCluster, the tiny model, the tiny synthetic world: the same session instances as tests/flows).

The operator cases (tests/faults/test_operator_faults.py, test_orphans.py) run ``copgen complete`` as a
subprocess, as an operator does, and compare what a disturbed run leaves with one uninterrupted reference
run shared by the whole session (``reference_run``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
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


# ---- processes ------------------------------------------------------------------------------------------

def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for(predicate, limit_s: float) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.25)
    return predicate()


def kill_all(pids) -> None:
    """Clean up after a test (only the processes it started)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


# ---- the CLI as an operator runs it -----------------------------------------------------------------------

STARTED = "samples to generate"  # the progress start line: the lease is held, blocks are being handed out
FIRST_BLOCK = "blocks 1/"  # the first block is committed (data, table part, marker)


def complete_args(world: str, model: tuple[str, str], out: Path | str) -> list[str]:
    """A lean run: 4 blocks of one sample, 3 steps, one local worker process."""
    net, vae = model
    return ["complete", "--source", world, "--out", str(out), "--weights", net, "--vae", vae,
            "--workers", "1", "--steps", "3", "--block-samples", "1", "--json"]


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", **extra}


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", "copgen.flows.cli", *args], capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout)


class Driver:
    """``copgen`` in the background, its stderr (progress lines) in a file the test polls."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("w") as err, log.with_suffix(".out").open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "copgen.flows.cli", *args], stdout=out,
                                         stderr=err, text=True, env=env or cli_env())
        self.pid = self.proc.pid

    @property
    def stderr(self) -> str:
        return self.log.read_text()

    @property
    def stdout(self) -> str:
        return self.log.with_suffix(".out").read_text()

    def wait_for_line(self, text: str, limit_s: float = 400) -> None:
        """Until ``text`` is on stderr; fails when the run ended first."""
        assert wait_for(lambda: text in self.stderr or self.proc.poll() is not None, limit_s), \
            f"no {text!r} within {limit_s} s"
        assert self.proc.poll() is None, f"ended (rc {self.proc.returncode}) before {text!r}:\n" + \
            self.stderr[-3000:]

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---- what a run leaves ------------------------------------------------------------------------------------

def cube_snapshot(out: Path | str) -> dict[str, dict]:
    """The cube's integer and string arrays, one entry per sample key (so a test also sees a duplicated or
    missing sample). Exact comparison holds by construction: the tiles are uint8 computed with the same
    seeds on the same machine, origin/done are small integer codes, the rest are copied keys. The float64
    metadata (centre, transform) are copies of the source's and not compared."""
    from copgen.storage.cubes import Cube

    cube = Cube.open(str(Path(out) / "complete.zarr"))
    keys = sample_keys(cube)
    assert len(keys) == len(set(keys)), "a sample appears twice in the cube"
    arrays = {name: np.asarray(arr[:]) for name, arr in cube.group.arrays()
              if arr.shape and arr.shape[0] == len(keys) and not np.issubdtype(arr.dtype, np.floating)}
    return {key: {name: a[i].tobytes() if a.dtype.kind in "biu" else str(a[i]) for name, a in arrays.items()}
            for i, key in enumerate(keys)}


def provenance_counts(out: Path | str) -> tuple[int, int]:
    """(rows, distinct (sample, iteration, modality) keys) over every part of the provenance table."""
    table = Path(out) / "tables" / "provenance"
    return duckdb.connect().execute(
        f"SELECT count(*), count(DISTINCT (sample, iteration, modality)) FROM "
        f"read_parquet('{table}/**/*.parquet', hive_partitioning=true)").fetchone()


def assert_same_as_reference(out: Path | str, reference: dict) -> None:
    """No sample lost or duplicated, byte-identical arrays, each provenance key exactly once."""
    snap = cube_snapshot(out)
    assert sorted(snap) == sorted(reference["snapshot"]), "samples lost or added"
    for key, arrays in reference["snapshot"].items():
        for name, value in arrays.items():
            assert snap[key][name] == value, f"{name} of sample {key} differs from the uninterrupted run"
    assert provenance_counts(out) == reference["provenance"]
    assert not list(Path(out).rglob("*.tmp")), "a temporary file survived"


@pytest.fixture(scope="session")
def reference_run(tiny_world, tiny_model, prefect_api, tmp_path_factory) -> dict:
    """One uninterrupted ``copgen complete`` (the session's Prefect API, its own one-worker cluster), run
    once for every operator fault test."""
    root, _ = tiny_world
    out = tmp_path_factory.mktemp("reference") / "out"
    done = run_cli(complete_args(root, tiny_model, out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows, keys = provenance_counts(out)
    snap = cube_snapshot(out)
    assert len(snap) >= 3 and rows == keys > 0
    return {"out": out, "snapshot": snap, "provenance": (rows, keys)}
