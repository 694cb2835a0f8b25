"""Finding 9: credentials never enter flow-run parameters, logs, provenance, tables or cubes. Credential-like
``--storage-option`` keys are refused (the value is never echoed); a run with sentinel credentials in its
environment leaves no trace of them in Prefect's database, the logs, the tables or the cube."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from copgen.flows.cli import app
from typer.testing import CliRunner

SENTINELS = ("SENTINELKEYID0123456789", "SENTINELSECRET/abcdefghijklmnop", "SENTINELTOKEN987654321")


@pytest.mark.parametrize("key", ["key", "secret", "token", "aws_secret_access_key", "password",
                                 "client_secret", "session_token"])
def test_credential_options_are_refused_without_echoing_them(key, tmp_path):
    value = "SENTINEL-VALUE-42"
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "x.zarr"), "--storage-option", f"{key}={value}"])
    assert res.exit_code == 2
    assert "refused on the command line" in res.output and "environment" in res.output
    assert value not in res.output


def _grep(root: Path, needles) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p}: {n}" for n in needles if n.encode() in data]
    return hits


@pytest.mark.slow
def test_sentinel_credentials_leave_no_trace(tiny_world, tiny_model, tmp_path):
    root, _ = tiny_world
    net, vae = tiny_model
    home, out = tmp_path / "prefect-home", tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # its own server and database
    env.update(PREFECT_HOME=str(home), AWS_ACCESS_KEY_ID=SENTINELS[0], AWS_SECRET_ACCESS_KEY=SENTINELS[1],
               AWS_SESSION_TOKEN=SENTINELS[2], PREFECT_LOGGING_LEVEL="DEBUG")
    res = subprocess.run([sys.executable, "-m", "copgen.flows.cli", "complete", "--source", root, "--out",
                          str(out), "--weights", net, "--vae", vae, "--workers", "1", "--steps", "2",
                          "--solver", "2m", "--verbose", "--json"],
                         capture_output=True, text=True, env=env, timeout=480)
    assert res.returncode == 0, res.stderr[-3000:]
    assert list(home.rglob("*.db")), "the run's Prefect database was not where expected"
    assert (out / "tables" / "provenance").is_dir() and (out / "complete.zarr" / "zarr.json").is_file()
    logs = res.stdout + res.stderr
    assert not [n for n in SENTINELS if n in logs]
    assert _grep(home, SENTINELS) == [] and _grep(out, SENTINELS) == []
