"""Cluster jobs before anything is sent: will this job work on that cluster, and what exactly
is sent (the job package, its runtime env, entrypoint and metadata).

A job submitted to a cluster runs `orchestrator run` on the head node, inside a temporary
working directory that Ray unpacks there, with workers on any node. So every path and URI in
the spec must mean the same thing on every node as on the submitting machine, and nothing the
job writes may land in that temporary directory. `submission_problems` checks exactly that;
it is a pure function of the spec and a `ClusterInfo`. The Ray Jobs API calls live in
`cluster/jobs.py`.
"""

from __future__ import annotations

import getpass
import ipaddress
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from orchestrator.spec import SPEC_FILE, JobSpec, Problem, redact_uri
from orchestrator.spec.checks import is_uri

JOB_FILE = SPEC_FILE
MODEL_DIR = "model"
# Ray uploads a working directory through the GCS (hard limit 512 MiB, a warning past 256 MiB);
# a model that size belongs on a hub or on shared storage, not in every submission.
MAX_PACKAGE_BYTES = 256 * 2**20
# Distributions the cluster provides itself (its Ray must stay the one it was started with).
_PROVIDED_BY_CLUSTER = {"ray"}
_MLFLOW_SERVER_FIX = "point tracking.uri at an MLflow server every node can reach (infra/mlflow), " \
                     "e.g. --set tracking.uri=http://mlflow.internal:5000"


@dataclass(frozen=True)
class ClusterInfo:
    """What a submission needs to know about the cluster: its alive nodes and their resources."""

    nodes: int
    cpus: float
    gpus: float
    address: str = ""
    gpu_types: tuple[str, ...] = ()  # the GPU nodes' `accelerator_type` resources (H100, A100, ...)

    def workers_may_span_nodes(self, spec: JobSpec) -> bool:
        """True when the job's driver and workers may run on more than one node: the cluster has
        several nodes now, or cannot hold all workers now (so an autoscaler would add nodes)."""
        d = spec.distributed
        need_gpus = d.num_workers if d.use_gpu is True else 0
        return self.nodes > 1 or self.cpus < d.num_workers * d.cpus_per_worker or self.gpus < need_gpus


ACCELERATOR_RESOURCE = "accelerator_type:"  # Ray's resource naming a node's GPU type


def cluster_info(resources_total: list[dict[str, float]], address: str = "") -> ClusterInfo:
    """The cluster as its alive nodes' `resources_total` describe it (Ray's state API): CPUs,
    GPUs, and the types of the GPUs (`accelerator_type:H100` on a node with GPUs -> "H100")."""
    types = {key[len(ACCELERATOR_RESOURCE):] for totals in resources_total if totals.get("GPU")
             for key in totals if key.startswith(ACCELERATOR_RESOURCE)}
    return ClusterInfo(nodes=len(resources_total), cpus=sum(t.get("CPU", 0.0) for t in resources_total),
                       gpus=sum(t.get("GPU", 0.0) for t in resources_total), address=address,
                       gpu_types=tuple(sorted(types)))


def cluster_gpu_budget(cluster: ClusterInfo) -> tuple[int, str]:
    """The memory of one of the cluster's GPUs to plan a job against, and where that figure
    came from: its GPU type's (the smallest, when it has several types), else the default."""
    from orchestrator.planning.budget import AMBIGUOUS_GPU_TYPES, DEFAULT_GPU_MEMORY, GPU_MEMORY_BY_TYPE
    from orchestrator.planning.units import human

    known = [t for t in cluster.gpu_types if t in GPU_MEMORY_BY_TYPE]
    if not known:
        what = (f"its GPU type {', '.join(cluster.gpu_types)} is not one the planner knows" if cluster.gpu_types
                else "its GPUs name no type (no accelerator_type resource)" if cluster.gpus
                else "it has no GPUs now")
        return DEFAULT_GPU_MEMORY, f"the default {human(DEFAULT_GPU_MEMORY)} GPU: {what}"
    smallest = min(known, key=lambda t: GPU_MEMORY_BY_TYPE[t])
    notes = ["from its accelerator_type resource"]
    if len(cluster.gpu_types) > 1:
        notes.append(f"the smallest of its GPU types {', '.join(cluster.gpu_types)}")
    if smallest in AMBIGUOUS_GPU_TYPES:
        notes.append(f"{smallest} comes as {AMBIGUOUS_GPU_TYPES[smallest]}: planned for "
                     f"{human(GPU_MEMORY_BY_TYPE[smallest])}")
    return GPU_MEMORY_BY_TYPE[smallest], f"the cluster's {smallest} GPUs ({'; '.join(notes)})"


# --- where paths and URIs point ------------------------------------------------------------------


def is_remote_uri(path: str) -> bool:
    """s3://, gs://, abfs://, hdfs://... (anything with a scheme except file://)."""
    return is_uri(path) and urlsplit(path).scheme not in ("", "file")


def _local_path(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def is_loopback_host(host: str | None) -> bool:
    """localhost, 127.0.0.0/8, ::1, or an unspecified address (0.0.0.0): this machine only."""
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def tracking_location(uri: str) -> str:
    """Where a tracking URI points: 'relative' (a file relative to the working directory),
    'file' (an absolute path on one machine), 'loopback' (a server on this machine only),
    or 'remote' (a server or database reachable by address)."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        path = parts.path if parts.scheme else uri
        return "file" if Path(path).expanduser().is_absolute() else "relative"
    if parts.scheme == "sqlite":
        # sqlite:///relative.db (three slashes) vs sqlite:////absolute.db (four).
        return "file" if uri.startswith("sqlite:////") else "relative"
    return "loopback" if is_loopback_host(parts.hostname) else "remote"


# --- the checks ------------------------------------------------------------------------------------


def submission_problems(spec: JobSpec, cluster: ClusterInfo, *, allow_local_tracking: bool = False) -> list[Problem]:
    """Everything about `spec` that cannot work on `cluster`, one problem per field.

    `allow_local_tracking` declares that the cluster runs on this machine, so loopback servers
    and local files reach every node (a single-machine cluster, the tests)."""
    return [*_tracking_problems(spec, cluster, allow_local_tracking), *_storage_problems(spec, cluster),
            *package_problems(spec)]


def _tracking_problems(spec: JobSpec, cluster: ClusterInfo, allow_local: bool) -> list[Problem]:
    uri = spec.tracking.uri
    where = tracking_location(uri)
    if where == "relative":
        return [Problem(path="tracking.uri",
                        message=f"'{uri}' is a file relative to the job's working directory, which on the "
                                "cluster is a temporary directory deleted with the job",
                        fix=_MLFLOW_SERVER_FIX)]
    if where == "loopback" and not allow_local:
        return [Problem(path="tracking.uri",
                        message=f"'{redact_uri(uri)}' names this machine (loopback); on the cluster it means "
                                "each node itself",
                        fix=f"{_MLFLOW_SERVER_FIX}; if the cluster runs on this machine, pass "
                            "--allow-local-tracking")]
    if where == "file" and not allow_local and cluster.workers_may_span_nodes(spec):
        return [Problem(path="tracking.uri",
                        message=f"'{uri}' is a file on one machine, but the job may run on "
                                f"{_nodes(cluster)} and rank 0 logs metrics from its own node",
                        fix=_MLFLOW_SERVER_FIX)]
    return []


def _storage_problems(spec: JobSpec, cluster: ClusterInfo) -> list[Problem]:
    s = spec.storage
    if is_remote_uri(s.path):
        return []
    path = _local_path(s.path)
    if not Path(path).expanduser().is_absolute():
        return [Problem(path="storage.path",
                        message=f"'{s.path}' is relative to the job's working directory, a temporary "
                                "directory on the cluster: checkpoints would be deleted with the job",
                        fix="use s3://bucket/prefix, or an absolute path that every node mounts with "
                            "storage.shared=true (e.g. /mnt/cluster_storage/runs)")]
    if not s.shared and cluster.workers_may_span_nodes(spec):
        return [Problem(path="storage.path",
                        message=f"'{s.path}' is a node-local path, but the job may run on "
                                f"{_nodes(cluster)}: each worker writes its checkpoint on its own node "
                                "and the driver reads it back on the head",
                        fix="mount shared storage (NFS, EFS, a shared PVC) at that path on every node and "
                            "set storage.shared=true, or use s3://bucket/prefix")]
    return []


def _nodes(cluster: ClusterInfo) -> str:
    if cluster.nodes > 1:
        return f"several nodes (the cluster has {cluster.nodes})"
    return "several nodes (the cluster cannot hold all its workers now, so it would add nodes)"



# --- what is sent --------------------------------------------------------------------------------


def local_model_dir(spec: JobSpec) -> Path | None:
    """The base model's local directory, when `model.base` is one (after `load_spec` it is absolute)."""
    base = spec.model.base
    if base.startswith("builtin:") or not Path(base).is_absolute():
        return None
    return Path(base) if Path(base).is_dir() else None


def package_files(spec: JobSpec) -> tuple[JobSpec, dict[str, Path]]:
    """The spec as it reads inside the job package (file references relative to the job file)
    and the local files to put beside it: {name in the package: local path}. A data source in
    remote storage (s3://, gs://) is read where it is and not packaged; a directory or glob
    travels as a directory of its files, in their order."""
    from orchestrator.data.sources import resolve_source

    packaged = spec.model_copy(deep=True)
    files: dict[str, Path] = {}
    d = packaged.data
    for split, field_path in (("train", "data.train"), ("eval", "data.eval")):
        value = getattr(d, split)
        if not isinstance(value, str) or is_uri(value):
            continue
        if Path(value).is_file():
            files[f"{split}{Path(value).suffix}"] = Path(value)
            setattr(d, split, f"{split}{Path(value).suffix}")
            continue
        # A directory or a glob: its files, numbered in the order the job reads them.
        for i, f in enumerate(resolve_source(value, field_path).files):
            files[f"{split}/{i:05d}-{Path(f).name}"] = Path(f)
        setattr(d, split, split)
    model = local_model_dir(spec)
    if model is not None:
        files[MODEL_DIR] = model
        packaged.model.base = f"./{MODEL_DIR}"
    return packaged, files


def package_problems(spec: JobSpec) -> list[Problem]:
    """The package Ray uploads through its GCS (the data files and a local model directory) must
    stay under `MAX_PACKAGE_BYTES`; each large part is named with where it should live instead."""
    _, files = package_files(spec)
    sizes: dict[str, int] = {}
    for name, path in files.items():
        part = name.split("/")[0]
        found = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
        sizes[part] = sizes.get(part, 0) + sum(f.stat().st_size for f in found)
    total = sum(sizes.values())
    if total <= MAX_PACKAGE_BYTES:
        return []
    where = {"model": ("model.base", "use a hub id, or put the model on storage every node mounts and submit "
                                     "from a machine that mounts it too"),
             "train": ("data.train", "put the data in a bucket (s3://..., gs://...) and name its URI: it is read "
                                     "where it is, not sent"),
             "eval": ("data.eval", "put the data in a bucket (s3://..., gs://...) and name its URI")}
    largest = max(sizes, key=sizes.get)
    field_path, fix = where[largest.split(".")[0]]
    parts = ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in sorted(sizes.items(), key=lambda x: -x[1]))
    return [Problem(path=field_path,
                    message=f"the job package would be {total / 2**20:.0f} MiB ({parts}), too large to send "
                            f"with the job (at most {MAX_PACKAGE_BYTES // 2**20} MiB)",
                    fix=fix)]


def write_package(spec: JobSpec, dest: Path) -> JobSpec:
    """Write the job package into `dest`: `job.yaml` (the fully-resolved spec) and the data and
    model files it names. Returns the packaged spec."""
    packaged, files = package_files(spec)
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    (dest / JOB_FILE).write_text(packaged.to_yaml(), encoding="utf-8")
    return packaged


def entrypoint(job_file: str = JOB_FILE, force: bool = False) -> str:
    """The command the cluster runs: this project's `run`, joining the cluster it runs on, with
    the job's files confined to its package (`confinement_problems`); `force` passes `--force`
    (a job submitted past its memory plan runs past it there too)."""
    return f"python -m orchestrator run {job_file} --address auto --confined" + (" --force" if force else "")


def confinement_problems(spec: JobSpec, job_dir: Path, workdir: Path) -> list[Problem]:
    """Paths of a submitted job that leave its working directory: data files and a local model
    must lie inside the package (`job_dir`, where `load_spec` resolved them), and relative output
    paths (storage.path, a sqlite tracking file) must not climb out of `workdir`. Absolute output
    paths and URIs are the shared storage a cluster job is meant to write to."""
    problems = []
    job_dir, workdir = job_dir.resolve(), workdir.resolve()
    inputs = {"data.train": spec.data.train, "data.eval": spec.data.eval,
              "model.base": str(local_model_dir(spec) or "")}
    for field_path, value in inputs.items():
        if isinstance(value, str) and value and not Path(value).resolve().is_relative_to(job_dir):
            problems.append(Problem(path=field_path, message=f"'{value}' is outside the job's directory {job_dir}",
                                    fix="a submitted job reads only the files packaged with it: name a file "
                                        "beside job.yaml (orchestrator submit packages them for you)"))
    outputs = {"storage.path": _local_path(spec.storage.path) if not is_remote_uri(spec.storage.path) else "",
               "tracking.uri": spec.tracking.uri[len("sqlite:///"):] if tracking_location(spec.tracking.uri)
               == "relative" and spec.tracking.uri.startswith("sqlite:///") else ""}
    for field_path, value in outputs.items():
        if value and not Path(value).is_absolute() and not (workdir / value).resolve().is_relative_to(workdir):
            problems.append(Problem(path=field_path, message=f"'{value}' climbs out of the job's working directory",
                                    fix="use an absolute path on shared storage, or a URI (s3://..., http://...)"))
    return problems


def pinned_requirements() -> list[str]:
    """This project's dependencies pinned to the versions installed here, so the cluster runs the
    stack the job was validated with. Local version labels are dropped (a laptop's `+cpu` torch
    must not become the cluster's torch); Ray itself is the cluster's own."""
    import re
    from importlib.metadata import PackageNotFoundError, requires, version

    pins = []
    for req in requires("orchestrator") or []:
        if "extra ==" in req:
            continue
        name = re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0]
        if name.lower() in _PROVIDED_BY_CLUSTER:
            continue
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(req.split(";")[0].strip())
    return pins


def runtime_env(working_dir: str, *, code_dir: str | None, requirements: list[str] | None,
                image: str | None = None) -> dict:
    """The Ray runtime env of a submission: the package as the working directory, this
    project's code as a module (so the cluster runs the code that validated the job), and
    either pinned pip requirements or a container image (or neither: the cluster's own image
    has the stack, e.g. infra/docker)."""
    env: dict = {"working_dir": working_dir, "env_vars": {"PYTHONUNBUFFERED": "1"},
                 "excludes": ["__pycache__", "*.pyc"]}
    if code_dir:
        env["py_modules"] = [code_dir]
    if image:
        env["image_uri"] = image
    elif requirements:
        env["pip"] = {"packages": requirements, "pip_check": False}
    return env


def metadata(spec: JobSpec, user: str | None = None) -> dict[str, str]:
    """What the cluster records with the job (never credentials)."""
    from orchestrator import __version__

    return {"orchestrator.job": spec.name, "orchestrator.spec_hash": spec.spec_hash(),
            "orchestrator.user": user or _user(), "orchestrator.version": __version__,
            "orchestrator.experiment": spec.experiment,
            "orchestrator.tracking_uri": redact_uri(spec.tracking.uri)}


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        return "unknown"


def submission_id(spec: JobSpec, now: float | None = None) -> str:
    """A readable, unique id: job name, UTC time, and a random suffix."""
    import secrets
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{spec.name}-{stamp}-{secrets.token_hex(2)}"


@dataclass
class JobPackage:
    """Everything `submit` sends to the Jobs API."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str] = field(default_factory=dict)
