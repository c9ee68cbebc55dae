"""A job as KubeRay manifests: a ConfigMap with the job package and a `RayJob` that starts a
Ray cluster sized from the spec, runs the job on it and deletes the cluster afterwards; and the
`orchestrator serve` deployment as a `RayService` (its Serve config plus the cluster it runs on).

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

from orchestrator.spec import JobSpec, Problem, redact_uri
from orchestrator.cluster.submission import (JOB_FILE, ClusterInfo, entrypoint, local_model_dir, metadata,
                                             package_files, submission_problems, tracking_location)
from orchestrator.serving.deployment import MAX_BATCH

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
    return _ray_cluster(opts, workers=d.num_workers, cpus_per_worker=d.cpus_per_worker, gpu=d.use_gpu is not False,
                        head_mounts=[{"name": "job", "mountPath": JOB_MOUNT}],
                        head_volumes=[{"name": "job", "configMap": {"name": config_map}}])


def _ray_cluster(opts: K8sOptions, *, workers: int, cpus_per_worker: int, gpu: bool, head_mounts: list[dict],
                 head_volumes: list[dict], head_ports: tuple[dict, ...] = ()) -> dict:
    """A fixed-size Ray cluster: a head that runs no work, and one pod per worker (a training
    worker, or a Serve replica)."""
    storage = {"name": "cluster-storage", "mountPath": STORAGE_MOUNT}
    storage_volume = {"name": "cluster-storage", "persistentVolumeClaim": {"claimName": opts.storage_claim}}
    head_resources = {"cpu": str(opts.head_cpus), "memory": opts.head_memory}
    # One pod per worker: Ray reads the pod's CPU and GPU limits as its resources, so each pod
    # holds exactly one worker (cpus_per_worker CPUs, 1 GPU).
    worker_resources = {"cpu": str(cpus_per_worker), "memory": opts.worker_memory,
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
                                          {"containerPort": 10001, "name": "client"}, *head_ports],
                                "volumeMounts": [storage, *head_mounts]}],
                "volumes": [storage_volume, *head_volumes],
            }},
        },
        "workerGroupSpecs": [{
            "groupName": "gpu-workers" if gpu else "cpu-workers",
            "replicas": workers, "minReplicas": workers, "maxReplicas": workers,
            "rayStartParams": {},
            "template": {"spec": worker_pod},
        }],
    }


# Ray Serve imports this with the config's `args` to build the application (an application builder).
SERVE_IMPORT_PATH = "orchestrator.serving.deployment:app_builder"
SERVE_PORT = 8000


@dataclass(frozen=True)
class ServeOptions:
    """`orchestrator serve`'s deployment: registered refs of one base, where the registry is, and
    its size (one pod per replica, each loading the base once)."""

    models: tuple[str, ...]
    tracking_uri: str
    name: str = "orchestrator-serve"
    replicas: int = 1
    cpus_per_replica: int = 2
    gpu: bool = False
    reload_every: float | None = 60.0
    max_batch: int = MAX_BATCH  # requests a replica completes together at most


def serve_problems(serve: ServeOptions) -> list[Problem]:
    """What keeps the deployment from running on a cluster: a registry only this machine can read,
    or nothing to serve."""
    problems = []
    if not serve.models:
        problems.append(Problem(path="--serve", message="no model to serve",
                                fix="name one or more registered versions: --serve models:/NAME@ALIAS"))
    where = tracking_location(serve.tracking_uri)
    if where != "remote":
        problems.append(Problem(path="--tracking-uri",
                                message=f"'{redact_uri(serve.tracking_uri)}' is {'a file' if where != 'loopback' else 'a server'}"
                                        " on this machine: the replicas read the registry from the cluster's pods",
                                fix="point it at the team's MLflow server, e.g. "
                                    "--tracking-uri http://mlflow.mlflow.svc.cluster.local:5000"))
    return problems


def serve_config(serve: ServeOptions) -> dict:
    """The Ray Serve config (`serveConfigV2`) of the deployment `orchestrator serve` runs: one
    application built by `SERVE_IMPORT_PATH` from these args."""
    return {"http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
            "applications": [{
                "name": "orchestrator", "route_prefix": "/", "import_path": SERVE_IMPORT_PATH,
                "args": {"models": list(serve.models), "tracking_uri": serve.tracking_uri,
                         "replicas": serve.replicas, "reload_every": serve.reload_every,
                         "cpus_per_replica": serve.cpus_per_replica, "gpus_per_replica": 1 if serve.gpu else 0,
                         "max_batch": serve.max_batch},
            }]}


def service_manifest(serve: ServeOptions, opts: K8sOptions = K8sOptions()) -> dict:
    """A KubeRay `RayService` for the deployment; call `serve_problems` first. KubeRay creates the
    `NAME-serve-svc` Service on port 8000 in front of it. Credentials for an MLflow server that
    needs them come from the image's environment (MLFLOW_TRACKING_USERNAME/PASSWORD), never the
    manifest."""
    name = k8s_name(serve.name)
    labels = {"app.kubernetes.io/part-of": "orchestrator", "orchestrator/serve": name}
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": name, "namespace": opts.namespace, "labels": labels},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(serve), sort_keys=False),
            "rayClusterConfig": _ray_cluster(opts, workers=serve.replicas, cpus_per_worker=serve.cpus_per_replica,
                                             gpu=serve.gpu, head_mounts=[], head_volumes=[],
                                             head_ports=({"containerPort": SERVE_PORT, "name": "serve"},)),
        },
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the job file, the data, the runtime env) as readable `|` blocks."""


_BlockDumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_yaml(docs: list[dict]) -> str:
    return yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False, width=120)
