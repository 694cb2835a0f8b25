"""The scheduled ``complete`` deployment, checked without a server: object, schedule, next run times."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from copgen.flows.cli import app
from copgen.flows.deploy import DeployError, build_deployment, next_runs
from typer.testing import CliRunner

PARAMS = {"source": "s3://bucket/majortom", "out": "s3://bucket/completed", "weights": "w.safetensors",
          "vae": "v.safetensors", "cluster": "tcp://scheduler:8786"}


def test_deployment_object_carries_flow_schedule_and_parameters():
    d = build_deployment("nightly-complete", "0 3 * * *", PARAMS)
    assert d.name == "nightly-complete"
    # a module path: workers load the installed package, never a file of the deploying checkout
    assert d.entrypoint == "copgen.flows.complete.complete_flow"
    (sched,) = d.schedules
    assert sched.schedule.cron == "0 3 * * *" and sched.active
    assert d.parameters == PARAMS


def test_next_run_times():
    start = datetime(2026, 1, 1, tzinfo=UTC)
    runs = next_runs("30 2 * * 1-5", 3, start=start)
    assert [r.isoformat() for r in runs] == [
        "2026-01-01T02:30:00+00:00", "2026-01-02T02:30:00+00:00", "2026-01-05T02:30:00+00:00"]


def test_invalid_cron_is_refused_clearly():
    with pytest.raises(DeployError, match="--cron '61 3 \\* \\* \\*'"):
        build_deployment("x", "61 3 * * *", PARAMS)


def test_deploy_command_prints_the_schedule(tmp_path):
    result = CliRunner().invoke(app, ["deploy", "--source", "s3://b/src", "--out", "s3://b/out", "--weights",
                                      "w.pth", "--vae", "v.pth", "--cron", "0 4 * * *", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "nightly-complete" in result.output and "0 4 * * *" in result.output


def test_deploy_requires_the_weights():
    """Production deployments name their checkpoints: no silent fallback to the small demo model."""
    result = CliRunner().invoke(app, ["deploy", "--source", "s3://b/src", "--out", "s3://b/out", "--dry-run"])
    assert result.exit_code == 2 and "--weights" in result.output


def test_bundled_weights_are_named_loudly():
    result = CliRunner().invoke(app, ["deploy", "--source", "s3://b/src", "--out", "s3://b/out", "--weights",
                                      "bundled", "--vae", "bundled", "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps lines at the terminal width
    assert "warning" in text and "not COP-GEN-Beta" in text


@pytest.mark.parametrize("serve", [False, True])
def test_deploy_without_a_server_is_one_clear_line(serve, tmp_path):
    """Registering and serving both need a real server: without PREFECT_API_URL the command says so and
    exits 2 (no temporary server, no traceback)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path)  # no profile with a server URL either
    copgen = Path(sys.executable).parent / "copgen"
    result = subprocess.run([str(copgen), "deploy", "--source", "s3://b/src", "--out", "s3://b/out",
                             "--weights", "w.pth", "--vae", "v.pth", *(["--serve"] if serve else [])],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no Prefect server: set PREFECT_API_URL" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_version_option():
    import copgen

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == copgen.__version__


def test_prefect_yaml_matches_the_flow_signature():
    import inspect
    from pathlib import Path

    import yaml
    from copgen.flows.complete import complete_flow

    spec = yaml.safe_load((Path(__file__).parents[2] / "infra" / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    module, name = dep["entrypoint"].rsplit(".", 1)
    assert name == "complete_flow" and module == "copgen.flows.complete"
    assert spec["pull"] == []  # the code is the installed package: no step into a checkout folder
    params = inspect.signature(complete_flow.fn).parameters
    assert set(dep["parameters"]) <= set(params)
    (sched,) = dep["schedules"]
    assert next_runs(sched["cron"], 1, start=datetime(2026, 1, 1, tzinfo=UTC))[0].hour == 3


def test_run_artifacts_show_summary_quarantine_and_links(prefect_api, tmp_path):
    """What an operator sees in the UI for a run with one quarantined sample (a real flow run)."""
    from copgen.flows import artifacts
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.context import get_run_context

    summary = {"run_id": "complete-x", "cube": str(tmp_path / "complete.zarr"), "samples_done": 7,
               "samples_total": 8, "quarantined": 1,
               "quarantine": [{"grid_cell": "12U_34R", "patch": "center", "modality": "S2L2A",
                               "reason": "thumbnail: not a PNG", "extra": "not shown"}]}

    @flow(name="artifacts-check")
    def run():
        artifacts.publish("complete", summary, elapsed_s=4.0, samples_run=8)
        return get_run_context().flow_run.id

    run_id = run()
    with get_client(sync_client=True) as client:
        found = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))}
    text = found["complete-summary"].data
    assert "| samples done | 7 of 8 |" in text and "| quarantined | 1 |" in text
    assert "| throughput | 2.00 samples/s |" in text and "| time | 4.0 s |" in text
    assert json.loads(found["complete-quarantine"].data) == [
        {"grid_cell": "12U_34R", "patch": "center", "modality": "S2L2A", "reason": "thumbnail: not a PNG"}]
    assert found["complete-cube"].type == "markdown" and f"file://{tmp_path}" in found["complete-cube"].data
