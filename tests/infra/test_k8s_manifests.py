"""The Kubernetes manifests stand on their own and validate: core kinds with `kubernetes-validate
--strict` (the command line an operator runs), the Dask operator's kinds against the vendored schema
(tests/infra/schemas/dask-operator-v1.schema.json, its source and version inside), their pod and service
specs against the same strict core schemas. Cross-references (Secret, Service, pool, image) resolve
within infra/k8s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
SCHEMA = Path(__file__).parent / "schemas" / "dask-operator-v1.schema.json"
DASK_KINDS = {"DaskCluster", "DaskAutoscaler"}


def _docs():
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _dask_validator():
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version
    from referencing import Registry, Resource

    defs = json.loads((Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" /
                       f"v{latest_version()}-local-strict" / "_definitions.json").read_text())
    schema = json.loads(SCHEMA.read_text())
    registry = Registry().with_resources([(defs["$id"], Resource.from_contents(defs)),
                                          (schema["$id"], Resource.from_contents(schema))])
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_core_kinds_pass_kubernetes_validate_strict():
    files = sorted({name for name, d in _docs() if d["kind"] not in DASK_KINDS})
    cli = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([str(cli), "--strict", *[str(K8S / f) for f in files]],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == sum(d["kind"] not in DASK_KINDS for _, d in _docs())


def test_dask_operator_kinds_match_the_crd_schema():
    validator = _dask_validator()
    dask_docs = [d for _, d in _docs() if d["kind"] in DASK_KINDS]
    assert {d["kind"] for d in dask_docs} == DASK_KINDS
    for doc in dask_docs:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{doc['kind']}: {errors}"


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d["spec"]["worker"].update(replicass=2), "unknown field"),
    (lambda d: d["spec"]["worker"]["spec"]["containers"][0].update(resource={}), "pod spec, strict"),
    (lambda d: d["spec"]["worker"].update(replicas="2"), "type"),
    (lambda d: d["spec"]["scheduler"].pop("service"), "required"),
])
def test_the_crd_schema_catches_mistakes(mutate, where):
    import copy

    (cluster,) = [d for _, d in _docs() if d["kind"] == "DaskCluster"]
    broken = copy.deepcopy(cluster)
    mutate(broken)
    assert list(_dask_validator().iter_errors(broken)), where


def test_gpu_workers_autoscale_on_gpu_nodes():
    docs = {d["kind"]: d for _, d in _docs() if d["kind"] in DASK_KINDS}
    worker = docs["DaskCluster"]["spec"]["worker"]["spec"]
    (container,) = worker["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "GPU=1" in container["args"]  # the flows annotate model tasks with this resource
    assert any(t["key"] == "nvidia.com/gpu" for t in worker["tolerations"]) and worker["nodeSelector"]
    assert docs["DaskAutoscaler"]["spec"]["cluster"] == docs["DaskCluster"]["metadata"]["name"]


def test_references_resolve_within_the_manifests():
    docs = _docs()
    secrets = {d["metadata"]["name"] for _, d in docs if d["kind"] == "Secret"}
    services = {d["metadata"]["name"] for _, d in docs if d["kind"] == "Service"}
    text = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    for ref in ("copgen-s3",):
        assert ref in secrets and f"secretRef: {{name: {ref}}}" in text
    assert "prefect-server" in services and "http://prefect-server:4200/api" in text
    # the operator names the scheduler Service <cluster>-scheduler; the deployment points there
    (cluster,) = [d for _, d in docs if d["kind"] == "DaskCluster"]
    assert f"tcp://{cluster['metadata']['name']}-scheduler:8786" in text
    images = {c["image"] for _, d in docs for c in _containers(d)}
    assert not any(i.endswith(":latest") or ":" not in i for i in images), images


def _containers(doc):
    spec = doc.get("spec", {})
    pods = [spec.get("template", {}).get("spec", {})]
    if doc["kind"] == "DaskCluster":
        pods = [spec["worker"]["spec"], spec["scheduler"]["spec"]]
    return [c for pod in pods for c in pod.get("containers", [])]
