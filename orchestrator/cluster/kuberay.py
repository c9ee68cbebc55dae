"""A job as KubeRay manifests: a ConfigMap with the job package and a `RayJob` that starts a
Ray cluster sized from the spec, runs the job on it and deletes the cluster afterwards.

Pure: spec in, manifest dicts out (`orchestrator k8s render` writes them as YAML). The image is
built from infra/docker/Dockerfile, so it already holds the stack and this project; the
ConfigMap carries the resolved job file and its data, mounted on the head where the driver runs.
Checkpoints go to `storage.path`: s3://..., or the shared volume every pod mounts at
`STORAGE_MOUNT` (the `cluster-storage` claim of infra/k8s/raycluster.yaml).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from orchestrator.spec import JobSpec, Problem
from orchestrator.cluster.submission import (JOB_FILE, ClusterInfo, entrypoint, local_model_dir, metadata,
                                             package_files, submission_problems)

RAY_VERSION = "2.60.0"
JOB_MOUNT = "/home/ray/job"
STORAGE_MOUNT = "/mnt/cluster_storage"
# A ConfigMap holds at most 1 MiB (etcd's object limit); leave room for the YAML around it.
MAX_CONFIGMAP_BYTES = 900 * 2**10


@dataclass(frozen=True)
class K8sOptions:
    image: str = "orchestrator:0.1.0"
    namespace: str = "default"
    storage_claim: str = "cluster-storage"
    worker_memory: str = "32Gi"
    head_cpus: int = 2
    head_memory: str = "8Gi"
    ttl_seconds: int = 600


def k8s_name(name: str) -> str:
    """A DNS-1123 name from a job name (KubeRay appends suffixes, so keep it short)."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40].strip("-")
    return out or "job"


def rendered_cluster(spec: JobSpec) -> ClusterInfo:
    """The cluster the RayJob creates: a head (no training CPUs) and one pod per worker."""
    d = spec.distributed
    gpu = d.use_gpu is not False
    return ClusterInfo(nodes=1 + d.num_workers, cpus=float(d.num_workers * d.cpus_per_worker),
                       gpus=float(d.num_workers if gpu else 0))


def render_problems(spec: JobSpec) -> list[Problem]:
    """What keeps this spec from running as a RayJob: the cluster checks, and what a ConfigMap
    cannot carry."""
    problems = submission_problems(spec, rendered_cluster(spec))
    if local_model_dir(spec) is not None:
        problems.append(Problem(path="model.base", message="a local model directory cannot travel in a manifest",
                                fix="use a hub id, or `orchestrator submit` to a running cluster"))
        return problems
    _, files = package_files(spec)
    size = sum(p.stat().st_size for p in files.values())
    if size > MAX_CONFIGMAP_BYTES:
        problems.append(Problem(path="data.train",
                                message=f"the data files are {size / 2**20:.1f} MiB, more than a ConfigMap holds "
                                        f"({MAX_CONFIGMAP_BYTES // 2**10} KiB)",
                                fix="use `orchestrator submit` to a running cluster (it uploads up to 256 MiB)"))
    return problems


def manifests(spec: JobSpec, opts: K8sOptions = K8sOptions()) -> list[dict]:
    """[ConfigMap, RayJob] for `spec`; call `render_problems` first."""
    name = k8s_name(spec.name)
    packaged, files = package_files(spec)
    data = {JOB_FILE: packaged.to_yaml(), **{n: p.read_text(encoding="utf-8") for n, p in files.items()}}
    labels = {"app.kubernetes.io/part-of": "orchestrator", "orchestrator/job": name}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{name}-job", "namespace": opts.namespace, "labels": labels},
                  "data": data}
    ray_job = {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": name, "namespace": opts.namespace, "labels": labels},
        "spec": {
            "entrypoint": entrypoint(f"{JOB_MOUNT}/{JOB_FILE}"),
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": {"PYTHONUNBUFFERED": "1"}}),
            "metadata": metadata(spec),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": opts.ttl_seconds,
            "backoffLimit": 0,
            "rayClusterSpec": _cluster_spec(spec, opts, config_map["metadata"]["name"]),
        },
    }
    return [config_map, ray_job]


def _cluster_spec(spec: JobSpec, opts: K8sOptions, config_map: str) -> dict:
    d = spec.distributed
    gpu = d.use_gpu is not False
    storage = {"name": "cluster-storage", "mountPath": STORAGE_MOUNT}
    storage_volume = {"name": "cluster-storage", "persistentVolumeClaim": {"claimName": opts.storage_claim}}
    head_resources = {"cpu": str(opts.head_cpus), "memory": opts.head_memory}
    # One pod per training worker: Ray reads the pod's CPU and GPU limits as its resources, so
    # each pod holds exactly one worker (cpus_per_worker CPUs, 1 GPU).
    worker_resources = {"cpu": str(d.cpus_per_worker), "memory": opts.worker_memory,
                        **({"nvidia.com/gpu": "1"} if gpu else {})}
    worker_pod: dict = {
        "containers": [{"name": "ray-worker", "image": opts.image,
                        "resources": {"requests": worker_resources, "limits": worker_resources},
                        "volumeMounts": [storage]}],
        "volumes": [storage_volume],
    }
    if gpu:
        worker_pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": False,
        "headGroupSpec": {
            # The head runs the driver (data loading, MLflow, registration), never a worker.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"spec": {
                "containers": [{"name": "ray-head", "image": opts.image,
                                "resources": {"requests": head_resources, "limits": head_resources},
                                "ports": [{"containerPort": 6379, "name": "gcs-server"},
                                          {"containerPort": 8265, "name": "dashboard"},
                                          {"containerPort": 10001, "name": "client"}],
                                "volumeMounts": [storage, {"name": "job", "mountPath": JOB_MOUNT}]}],
                "volumes": [storage_volume, {"name": "job", "configMap": {"name": config_map}}],
            }},
        },
        "workerGroupSpecs": [{
            "groupName": "gpu-workers" if gpu else "cpu-workers",
            "replicas": d.num_workers, "minReplicas": d.num_workers, "maxReplicas": d.num_workers,
            "rayStartParams": {},
            "template": {"spec": worker_pod},
        }],
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the job file, the data, the runtime env) as readable `|` blocks."""


_BlockDumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_yaml(docs: list[dict]) -> str:
    return yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False, width=120)
