"""The shipped infrastructure files cannot rot: each is parsed and checked against the schema of
the tool that reads it (KubeRay's CRDs, Ray's cluster launcher schema), and the image's pins
against the stack the tests run on."""

from __future__ import annotations

import json
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestrator.cluster import kuberay

from conftest import REPO
INFRA = REPO / "infra"
SCHEMA = yaml.safe_load((REPO / "tests" / "schemas" / "kuberay-v1.yaml").read_text())


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_raycluster_manifest():
    import ray

    pvc, cluster = docs(INFRA / "k8s" / "raycluster.yaml")
    jsonschema.validate(cluster, {**SCHEMA, "$ref": "#/$defs/RayCluster"})
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"} and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # a CPU head that trains nothing
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    [gpu] = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] > gpu["minReplicas"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # Head and workers mount the one shared volume where the rendered RayJobs expect it.
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for container, pod in ((head, spec["headGroupSpec"]), (worker, gpu)):
        assert {"name": "cluster-storage", "mountPath": kuberay.STORAGE_MOUNT} in container["volumeMounts"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == [pvc["metadata"]["name"]] == [kuberay.K8sOptions().storage_claim]


def test_mlflow_manifests():
    import mlflow

    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs(INFRA / "k8s" / "mlflow.yaml")}
    assert {("Namespace", "mlflow"), ("StatefulSet", "mlflow-postgres"), ("Service", "mlflow-postgres"),
            ("PersistentVolumeClaim", "mlflow-artifacts"), ("Deployment", "mlflow"), ("Service", "mlflow")} \
        == set(objects)
    server = objects[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    args = server["args"]
    assert args[args.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert args[args.index("--artifacts-destination") + 1] == "/mlartifacts"
    assert server["image"].endswith(f":{mlflow.__version__}")
    # The service name the docs tell jobs to use is one the server accepts as a Host header.
    hosts = {e["value"] for e in server["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS"}.pop().split(",")
    assert "mlflow.mlflow.svc.cluster.local:*" in hosts
    assert objects[("Service", "mlflow")]["spec"]["ports"][0]["port"] == 5000


def test_mlflow_local_recipe():
    import mlflow

    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    assert set(compose["services"]) == {"postgres", "mlflow"}
    command = compose["services"]["mlflow"]["command"]
    assert command[command.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert all(p.startswith("127.0.0.1:") for p in compose["services"]["mlflow"]["ports"])
    assert f"mlflow=={mlflow.__version__}" in (INFRA / "mlflow" / "Dockerfile").read_text()


def test_aws_cluster_launcher_config_matches_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((INFRA / "cluster" / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) > 0 and t.get("max_workers", 0) > 0 for t in types.values())
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_image_constraints_pin_the_tested_stack():
    pins = _pins((INFRA / "docker" / "constraints.txt").read_text())
    stack = ("torch", "ray", "transformers", "peft", "bitsandbytes", "deepspeed", "mlflow", "pydantic", "typer",
             "pyyaml", "safetensors", "tokenizers", "accelerate", "numpy", "pyarrow")
    assert set(stack) <= set(pins)
    stale = {}
    for name, pinned in pins.items():
        try:
            installed = version(name).split("+")[0]
        except PackageNotFoundError:
            continue
        if installed != pinned:
            stale[name] = (pinned, installed)
    assert not stale, f"infra/docker/constraints.txt is stale (pinned, installed): {stale}; regenerate it"


def test_dockerfile_installs_the_project_under_the_constraints():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-cudnn-runtime-", text, re.M)
    installs = [line for line in text.splitlines() if "pip install" in line or "pip wheel" in line]
    assert installs and all("-c /tmp/constraints.txt" in line for line in installs)
    assert any("/src" in line and "ray[default" in line for line in installs)


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for p in INFRA.rglob("*.yaml")))
def test_every_infra_yaml_parses(path):
    assert docs(REPO / path)
