"""Cluster submission without a cluster: the checks before sending, the job package, the runtime
env, the token lookup, and the KubeRay manifests (validated against the RayJob schema)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.cluster import kuberay
from orchestrator.cluster.jobs import ClusterError, find_token
from orchestrator.cluster.submission import (ClusterInfo, cluster_gpu_budget, cluster_info, entrypoint, metadata,
                                             pinned_requirements, runtime_env, submission_problems, tracking_location,
                                             write_package)
from orchestrator.spec import load_spec

from conftest import REPO, free_port

QUICKSTART = REPO / "jobs" / "quickstart.yaml"
SCHEMA = yaml.safe_load((REPO / "tests" / "schemas" / "kuberay-v1.yaml").read_text())

ONE_NODE = ClusterInfo(nodes=1, cpus=8, gpus=0)
TWO_NODES = ClusterInfo(nodes=2, cpus=2, gpus=0)
TOO_SMALL = ClusterInfo(nodes=1, cpus=1, gpus=0)  # cannot hold 2 workers: an autoscaler would add nodes


def quickstart(**sets):
    return load_spec(QUICKSTART, [f"{k}={v}" for k, v in sets.items()])


def validate(doc: dict, kind: str) -> None:
    jsonschema.validate(doc, {**SCHEMA, "$ref": f"#/$defs/{kind}"})


@pytest.mark.parametrize("uri, where", [
    ("sqlite:///mlflow.db", "relative"),
    ("sqlite:////data/mlflow.db", "file"),
    ("mlruns", "relative"),
    ("/data/mlruns", "file"),
    ("file:///data/mlruns", "file"),
    ("http://127.0.0.1:5000", "loopback"),
    ("http://localhost:5000", "loopback"),
    ("http://[::1]:5000", "loopback"),
    ("http://0.0.0.0:5000", "loopback"),
    ("postgresql://mlflow:pw@localhost/mlflow", "loopback"),
    ("http://mlflow.mlflow.svc.cluster.local:5000", "remote"),
    ("https://10.0.0.5", "remote"),
    ("databricks", "relative"),
])
def test_tracking_location(uri, where):
    assert tracking_location(uri) == where


REMOTE = {"tracking.uri": "http://mlflow.internal:5000"}
S3 = {"storage.path": "s3://bucket/runs"}
SHARED = {"storage.path": "/mnt/cluster_storage/runs", "storage.shared": "true"}

# (overrides, cluster, allow_local_tracking, expected problems as (path, start of message))
CASES = [
    ({}, ONE_NODE, False, [
        ("tracking.uri", "'sqlite:///mlflow.db' is a file relative to the job's working directory"),
        ("storage.path", "'runs' is relative to the job's working directory")]),
    ({**REMOTE, **S3}, TWO_NODES, False, []),
    ({**REMOTE, **SHARED}, TWO_NODES, False, []),
    ({**REMOTE, "storage.path": "file:///mnt/shared/runs", "storage.shared": "true"}, TWO_NODES, False, []),
    ({"tracking.uri": "http://127.0.0.1:5000", **S3}, ONE_NODE, False, [
        ("tracking.uri", "'http://127.0.0.1:5000' names this machine (loopback)")]),
    ({"tracking.uri": "http://127.0.0.1:5000", **S3}, TWO_NODES, True, []),
    ({"tracking.uri": "postgresql://u:secret@localhost/db", **S3}, ONE_NODE, False, [
        ("tracking.uri", "'postgresql://localhost/db' names this machine")]),
    ({"tracking.uri": "sqlite:////data/mlflow.db", "storage.path": "/data/runs"}, ONE_NODE, False, []),
    ({"tracking.uri": "sqlite:////data/mlflow.db", "storage.path": "/data/runs"}, TWO_NODES, False, [
        ("tracking.uri", "'sqlite:////data/mlflow.db' is a file on one machine, but the job may run on several "
                         "nodes (the cluster has 2)"),
        ("storage.path", "'/data/runs' is a node-local path, but the job may run on several nodes (the cluster "
                         "has 2)")]),
    ({"tracking.uri": "sqlite:////data/mlflow.db", **SHARED}, TWO_NODES, True, []),
    ({**REMOTE, "storage.path": "/data/runs"}, TOO_SMALL, False, [
        ("storage.path", "'/data/runs' is a node-local path, but the job may run on several nodes (the cluster "
                         "cannot hold all its workers now")]),
    ({**REMOTE, "storage.path": "/data/runs", "distributed.use_gpu": "true"}, ONE_NODE, False, [
        ("storage.path", "'/data/runs' is a node-local path")]),
]


@pytest.mark.parametrize("sets, cluster, allow_local, expected", CASES)
def test_submission_problems(sets, cluster, allow_local, expected):
    problems = submission_problems(quickstart(**sets), cluster, allow_local_tracking=allow_local)
    assert [(p.path, p.message[:len(m)]) for p, (_, m) in zip(problems, expected)] == expected
    assert len(problems) == len(expected)
    assert all(p.fix for p in problems)
    assert all("secret" not in str(p) for p in problems)


def test_loopback_fix_names_the_flag():
    [problem] = submission_problems(quickstart(**{"tracking.uri": "http://localhost:5000"}, **S3), ONE_NODE)
    assert "--allow-local-tracking" in problem.fix


# --- the package ---------------------------------------------------------------------------------


def test_package_holds_the_resolved_spec_and_its_data_with_relative_paths(tmp_path):
    spec = quickstart(**REMOTE, **SHARED, **{"training.max_steps": 7})
    packaged = write_package(spec, tmp_path)
    assert (packaged.data.train, packaged.data.eval) == ("train.jsonl", "eval.jsonl")
    assert (tmp_path / "train.jsonl").read_bytes() == Path(spec.data.train).read_bytes()
    # On the cluster, `orchestrator run job.yaml` loads it back relative to the package.
    loaded = load_spec(tmp_path / "job.yaml")
    assert loaded.data.train == str(tmp_path / "train.jsonl")
    assert loaded.training.max_steps == 7 and loaded.storage.shared
    assert loaded.model_dump(exclude={"data"}) == spec.model_dump(exclude={"data"})


def test_package_carries_a_local_model_directory(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    spec = quickstart(**REMOTE, **S3, **{"model.base": str(model)})
    packaged = write_package(spec, tmp_path / "pkg")
    assert packaged.model.base == "./model"
    assert (tmp_path / "pkg" / "model" / "config.json").is_file()
    assert load_spec(tmp_path / "pkg" / "job.yaml").model.base == str(tmp_path / "pkg" / "model")


def test_package_carries_directory_and_glob_sources_in_order_and_leaves_uris_where_they_are(tmp_path):
    """A directory or glob source travels as a directory of its files, numbered in the order the
    job reads them (so the data order on the cluster is the one here); an s3:// source is not
    packaged. The packaged job resolves to the same files' contents."""
    from orchestrator.data.sources import resolve_source

    data = tmp_path / "data"
    (data / "b").mkdir(parents=True)
    lines = [json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}"}) + "\n" for i in range(6)]
    for name, chunk in [("a.jsonl", lines[:2]), ("b/a.jsonl", lines[2:4]), ("c.jsonl", lines[4:])]:
        (data / name).write_text("".join(chunk))
    for train in (str(data), str(data / "**" / "*.jsonl")):
        pkg = tmp_path / f"pkg-{len(train)}"
        spec = quickstart(**REMOTE, **S3, **{"data.train": train, "data.eval": "s3://bucket/eval.jsonl"})
        packaged = write_package(spec, pkg)
        assert (packaged.data.train, packaged.data.eval) == ("train", "s3://bucket/eval.jsonl")
        here = resolve_source(spec.data.train).files
        there = resolve_source(str(pkg / "train")).files
        assert len(there) == 3 and [Path(f).read_text() for f in there] == [Path(f).read_text() for f in here]
        assert "".join(Path(f).read_text() for f in there) == "".join(lines)


def test_a_package_over_the_limit_names_its_largest_part_and_where_it_belongs(tmp_path, monkeypatch):
    import orchestrator.cluster.submission as submission

    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"instruction": "x", "input": "", "output": "y" * 400_000}) + "\n")
    spec = quickstart(**REMOTE, **S3, **{"data.train": str(big)})
    assert submission.package_problems(spec) == []
    monkeypatch.setattr(submission, "MAX_PACKAGE_BYTES", 300_000)
    [problem] = submission.package_problems(spec)
    assert problem.path == "data.train" and "train.jsonl" in problem.message and "s3://" in problem.fix
    assert problem in submission.submission_problems(spec, ONE_NODE)


def test_runtime_env_ships_code_and_pinned_requirements_or_an_image():
    pins = pinned_requirements()
    names = {p.split("==")[0].lower() for p in pins}
    assert {"torch", "transformers", "peft", "deepspeed", "bitsandbytes", "mlflow"} <= names
    assert "ray" not in names and not any("+" in p for p in pins)  # no laptop +cpu torch

    env = runtime_env("/tmp/pkg", code_dir="/src/orchestrator", requirements=pins)
    assert env["working_dir"] == "/tmp/pkg" and env["py_modules"] == ["/src/orchestrator"]
    assert env["pip"]["packages"] == pins
    image = runtime_env("/tmp/pkg", code_dir=None, requirements=pins, image="reg/orchestrator:1")
    assert image["image_uri"] == "reg/orchestrator:1" and "pip" not in image
    bare = runtime_env("/tmp/pkg", code_dir=None, requirements=None)
    assert "pip" not in bare and "image_uri" not in bare
    # The driver's ray.init adds its own env vars; the job's must not clash with them.
    from orchestrator.training.launch import WORKER_ENV

    assert not set(env["env_vars"]) & set(WORKER_ENV)
    assert entrypoint() == "python -m orchestrator run job.yaml --address auto --confined"
    # A job submitted past its memory plan (submit --force) runs past it on the cluster too.
    assert entrypoint(force=True) == "python -m orchestrator run job.yaml --address auto --confined --force"


# --- the cluster's GPUs, and the memory plan made against them ----------------------------------

GiB = 2**30
CPU_HEAD = {"CPU": 4.0, "memory": 8e9, "node:__internal_head__": 1.0}


def gpu_node(kind: str | None, gpus: float = 8.0) -> dict:
    return {"CPU": 32.0, "GPU": gpus, **({f"accelerator_type:{kind}": 1.0} if kind else {})}


@pytest.mark.parametrize("nodes, gpus, types", [
    ([CPU_HEAD], 0.0, ()),
    ([CPU_HEAD, gpu_node("H100"), gpu_node("H100")], 16.0, ("H100",)),
    ([gpu_node("L4", 1.0), gpu_node("A100")], 9.0, ("A100", "L4")),
    ([gpu_node(None)], 8.0, ()),  # a GPU node that names no type
    ([CPU_HEAD, {"CPU": 8.0, "TPU": 4.0, "accelerator_type:TPU-V4": 1.0}], 0.0, ()),  # not a GPU
])
def test_cluster_info_reads_the_gpu_types_from_the_nodes_resources(nodes, gpus, types):
    info = cluster_info(nodes, address="http://head:8265")
    assert (info.nodes, info.gpus, info.gpu_types) == (len(nodes), gpus, types)
    assert info.cpus == sum(n["CPU"] for n in nodes)


@pytest.mark.parametrize("types, gpus, size, source", [
    (("H100",), 8, 80 * GiB, "the cluster's H100 GPUs (from its accelerator_type resource; H100 comes as 80 or "
                             "94 GB (NVL): planned for 80 GiB)"),
    (("A100",), 8, 40 * GiB, "the cluster's A100 GPUs (from its accelerator_type resource; A100 comes as 40 or "
                             "80 GB: planned for 40 GiB)"),
    (("A100-80G",), 8, 80 * GiB, "the cluster's A100-80G GPUs (from its accelerator_type resource)"),
    (("T4",), 1, 16 * GiB, "the cluster's T4 GPUs (from its accelerator_type resource)"),
    (("H100", "L4"), 9, 24 * GiB, "the cluster's L4 GPUs (from its accelerator_type resource; the smallest of its "
                                  "GPU types H100, L4)"),
    (("GeForce-RTX-5090",), 1, 80 * GiB, "the default 80 GiB GPU: its GPU type GeForce-RTX-5090 is not one the "
                                         "planner knows"),
    ((), 8, 80 * GiB, "the default 80 GiB GPU: its GPUs name no type (no accelerator_type resource)"),
    ((), 0, 80 * GiB, "the default 80 GiB GPU: it has no GPUs now"),
])
def test_the_cluster_gpu_budget_comes_from_its_gpu_type(types, gpus, size, source):
    assert cluster_gpu_budget(ClusterInfo(nodes=1, cpus=8, gpus=gpus, gpu_types=types)) == (size, source)


@pytest.mark.parametrize("types, fits", [(("H100",), True), (("T4",), False), (("H100", "L4"), False)])
def test_a_7b_lora_job_is_planned_against_the_clusters_smallest_gpu(types, fits):
    from orchestrator.planning.budget import plan_for_run

    # bf16 Llama-2-7B with LoRA, 512 tokens: about 40 GiB per GPU (the catalogue's architecture, offline).
    spec = quickstart(**{"model.base": "meta-llama/Llama-2-7b-hf", "quantization.bits": "null",
                         "data.max_seq_len": 512})
    budget, source = cluster_gpu_budget(ClusterInfo(nodes=len(types), cpus=64, gpus=8, gpu_types=types))
    plan = plan_for_run(spec, spec.distributed.num_workers, budget, source=source)
    assert plan.fits is fits
    assert plan.gpu_memory_bytes == budget and plan.gpu_memory_source == source


SEVEN_B = {"model.base": "meta-llama/Llama-2-7b-hf", "quantization.bits": "null", "data.max_seq_len": 512}


@pytest.mark.parametrize("types, gpus, force, refused, line", [
    (("H100",), 8, False, False, "Memory plan: 39.6 GiB of 80 GiB per GPU (the cluster's H100 GPUs"),
    (("T4",), 8, False, True, "Memory plan: 39.6 GiB of 16 GiB per GPU (the cluster's T4 GPUs"),
    (("T4",), 8, True, False, "submitting it anyway (--force)"),
    ((), 0, False, False, "Memory plan: 39.6 GiB per GPU; not checked: the job trains on CPUs (the cluster has "
                          "no GPUs now)"),
])
def test_submit_plans_the_job_against_the_clusters_gpus(capsys, types, gpus, force, refused, line):
    """What `submit` does between the cluster's checks and sending the package."""
    import typer

    from orchestrator.cli.cluster import _plan_on_cluster

    info = ClusterInfo(nodes=1, cpus=64, gpus=gpus, gpu_types=types)
    if refused:
        with pytest.raises(typer.Exit) as e:
            _plan_on_cluster(quickstart(**SEVEN_B), info, force=force, source="job.yaml")
        assert e.value.exit_code == 2
    else:
        _plan_on_cluster(quickstart(**SEVEN_B), info, force=force, source="job.yaml")
    out = " ".join(capsys.readouterr().err.split())
    assert line in out, out
    assert ("refusing to submit a job that cannot fit the cluster's GPUs" in out) is refused
    if refused:
        assert "pass --force to submit it anyway" in out


def test_submit_refuses_a_search_whose_trials_cannot_fit_naming_the_searched_value(capsys):
    import typer

    from orchestrator.cli.cluster import _plan_on_cluster

    spec = quickstart(**SEVEN_B, tune="{space: {data.max_seq_len: {choice: [256, 4096]}}}")
    with pytest.raises(typer.Exit):
        _plan_on_cluster(spec, ClusterInfo(nodes=1, cpus=64, gpus=8, gpu_types=("A100",)), force=False,
                         source="job.yaml")
    out = " ".join(capsys.readouterr().err.split())
    assert "Memory plan: 2 trial(s) of the space need up to" in out, out
    assert "tune.space.data.max_seq_len: data.max_seq_len=4096: no planned trial with it fits 40 GiB per GPU" in out


def test_metadata_records_the_job_and_never_credentials():
    spec = quickstart(**{"tracking.uri": "https://user:secret@mlflow.example.com"}, **S3)
    meta = metadata(spec, user="ada")
    assert meta["orchestrator.spec_hash"] == spec.spec_hash()
    assert meta["orchestrator.user"] == "ada" and meta["orchestrator.job"] == "quickstart"
    assert meta["orchestrator.tracking_uri"] == "https://mlflow.example.com"
    assert all(isinstance(v, str) for v in meta.values())


# --- tokens --------------------------------------------------------------------------------------


def test_token_from_env_file_and_default_path(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("default-token\n")
    (tmp_path / "tok").write_text("file-token\n")
    local, remote = "http://127.0.0.1:8265", "http://head.example:8265"

    assert find_token(remote, {"RAY_AUTH_TOKEN": "env-token"}, home=home).value == "env-token"
    assert find_token(remote, {}, token_file=str(tmp_path / "tok"), home=home).source == f"file {tmp_path / 'tok'}"
    assert find_token(remote, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, home=home).value == "file-token"
    # Ray's default file goes to a cluster on this machine, or anywhere once token auth is asked for.
    assert find_token(local, {}, home=home).value == "default-token"
    assert find_token(remote, {}, home=home) is None
    assert find_token(remote, {"RAY_AUTH_MODE": "token"}, home=home).value == "default-token"


@pytest.mark.parametrize("content, message", [(None, "cannot read the Ray auth token file"),
                                              ("  \n", "is empty")])
def test_unreadable_or_empty_token_file_is_an_error(tmp_path, content, message):
    path = tmp_path / "tok"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ClusterError, match=message):
        find_token("http://h:8265", {"RAY_AUTH_TOKEN_PATH": str(path)}, home=tmp_path)


def test_token_value_never_appears_in_its_repr():
    token = find_token("http://h:8265", {"RAY_AUTH_TOKEN": "s3cr3t-value"})
    assert "s3cr3t-value" not in repr(token) and "s3cr3t-value" not in str(token)


# --- KubeRay -------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_gpu", ["true", "false", "auto"])
def test_rendered_rayjob_and_configmap_match_the_kuberay_schema(use_gpu):
    spec = quickstart(**REMOTE, **SHARED, **{"distributed.use_gpu": use_gpu, "distributed.cpus_per_worker": 4})
    assert kuberay.render_problems(spec) == []
    config_map, job = kuberay.manifests(spec, kuberay.K8sOptions(image="reg/orchestrator:1", namespace="ml"))
    validate(config_map, "ConfigMap")
    validate(job, "RayJob")
    s = job["spec"]
    assert s["shutdownAfterJobFinishes"] is True and s["entrypoint"].endswith("/home/ray/job/job.yaml --address auto --confined")
    assert yaml.safe_load(s["runtimeEnvYAML"]) == {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    [group] = s["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["cpu"] == "4"
    assert ("nvidia.com/gpu" in limits) == (use_gpu != "false")
    import ray

    assert s["rayClusterSpec"]["rayVersion"] == ray.__version__
    # The ConfigMap is the job package: job.yaml names its data beside it.
    shipped = yaml.safe_load(config_map["data"]["job.yaml"])
    assert shipped["data"]["train"] == "train.jsonl" and "train.jsonl" in config_map["data"]


def test_rendered_yaml_round_trips():
    spec = quickstart(**REMOTE, **S3)
    docs = list(yaml.safe_load_all(kuberay.to_yaml(kuberay.manifests(spec))))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert docs[0]["data"]["train.jsonl"] == Path(spec.data.train).read_text()


def test_schema_rejects_an_unknown_field():
    spec = quickstart(**REMOTE, **S3)
    _, job = kuberay.manifests(spec)
    job["spec"]["shutdownAfterJobFinish"] = True  # misspelt
    with pytest.raises(jsonschema.ValidationError):
        validate(job, "RayJob")


def test_k8s_render_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "rayjob.yaml"
    ok = runner.invoke(app, ["k8s", "render", str(QUICKSTART), "-o", str(out), "--image", "reg/o:1",
                             "--set", "tracking.uri=http://mlflow.mlflow.svc.cluster.local:5000",
                             "--set", "storage.path=/mnt/cluster_storage/runs", "--set", "storage.shared=true"])
    assert ok.exit_code == 0, ok.output
    config_map, job = yaml.safe_load_all(out.read_text())
    validate(job, "RayJob")
    assert job["metadata"]["name"] == "quickstart"

    refused = runner.invoke(app, ["k8s", "render", str(QUICKSTART)])
    assert refused.exit_code == 2
    assert "tracking.uri: 'sqlite:///mlflow.db' is a file relative" in refused.output
    assert "storage.path: 'runs' is relative" in refused.output


@pytest.mark.parametrize("gpu", [False, True])
def test_rendered_rayservice_is_what_serve_deploys(gpu):
    """`k8s render --serve`: a RayService the KubeRay schema accepts, whose Serve config Ray Serve's
    own schema accepts and whose import path builds `orchestrator serve`'s application with the
    replicas, resources and batch size asked for, on a cluster of one pod per replica."""
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    options = kuberay.ServeOptions(models=("models:/quickstart@production", "models:/quickstart/1"),
                                   tracking_uri="http://mlflow.mlflow.svc.cluster.local:5000", replicas=3,
                                   cpus_per_replica=4, gpu=gpu, max_batch=12)
    assert kuberay.serve_problems(options) == []
    doc = kuberay.service_manifest(options, kuberay.K8sOptions(namespace="ml"))
    validate(doc, "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    [application] = config.applications
    assert application.args["models"] == list(options.models)
    app = import_attr(application.import_path)(application.args)
    deployment = app._bound_deployment  # what serve.run would deploy (no public accessor)
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options == {"num_cpus": 4.0, **({"num_gpus": 1.0} if gpu else {})}
    # Serve gathers up to 12 requests into a batch, and a replica holds two batches' worth.
    assert deployment.func_or_class._complete._get_max_batch_size() == 12
    assert deployment.max_ongoing_requests == 24
    [group] = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["cpu"] == "4" and ("nvidia.com/gpu" in limits) is gpu


def test_k8s_render_serve_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "rayservice.yaml"
    ok = runner.invoke(app, ["k8s", "render", "--serve", "models:/quickstart@production", "-o", str(out),
                             "--tracking-uri", "http://mlflow.mlflow.svc.cluster.local:5000", "--replicas", "2"])
    assert ok.exit_code == 0, ok.output
    [service] = yaml.safe_load_all(out.read_text())
    validate(service, "RayService")
    # The registry must be one the cluster's pods reach; a sqlite file on this machine is not.
    refused = runner.invoke(app, ["k8s", "render", str(QUICKSTART), "--serve", "models:/quickstart@production"])
    assert refused.exit_code == 2
    assert "--tracking-uri: 'sqlite:///mlflow.db' is a file on this machine" in refused.output


@pytest.mark.parametrize("name, expected", [("quickstart", "quickstart"), ("My_Job.v2", "my-job-v2"),
                                            ("x" * 80, "x" * 40), ("__", "job")])
def test_k8s_name(name, expected):
    assert kuberay.k8s_name(name) == expected


def test_an_unreachable_cluster_is_one_line_and_exit_2():
    port = free_port()  # nothing listens on it
    result = CliRunner().invoke(app, ["jobs", "list", "--address", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 2
    assert f"cannot reach the Ray Jobs API at http://127.0.0.1:{port}" in result.output


# --- a submitted job stays inside its package -------------------------------------------------------


@pytest.mark.parametrize("sets, field", [
    ({}, None),  # the package as `submit` writes it: everything beside job.yaml
    ({"data.train": "../outside.jsonl"}, "data.train"),
    ({"data.eval": "/etc/hostname"}, "data.eval"),
    ({"storage.path": "../../runs"}, "storage.path"),
    ({"tracking.uri": "sqlite:///../mlflow.db"}, "tracking.uri"),
    ({"storage.path": "/mnt/cluster_storage/runs"}, None),  # shared storage, by design
    ({"storage.path": "s3://bucket/runs"}, None),
])
def test_confined_run_refuses_paths_outside_the_job(tmp_path, sets, field):
    from orchestrator.cluster.submission import confinement_problems

    package = tmp_path / "pkg"
    write_package(quickstart(), package)
    (tmp_path / "outside.jsonl").write_text((package / "train.jsonl").read_text())
    spec = load_spec(package / "job.yaml", [f"{k}={v}" for k, v in sets.items()])
    problems = confinement_problems(spec, package, package)
    assert [p.path for p in problems] == ([field] if field else [])


def test_confined_cli_run_exits_2_naming_the_field(tmp_path):
    package = tmp_path / "pkg"
    write_package(quickstart(), package)
    result = CliRunner().invoke(app, ["run", str(package / "job.yaml"), "--confined", "--set", "data.eval=/etc/hostname"])
    assert result.exit_code == 2
    assert "data.eval: '/etc/hostname' is outside the job's directory" in " ".join(result.output.split())
