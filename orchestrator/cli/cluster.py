"""CLI commands for clusters: `submit`, `jobs list|status|logs|stop`, `k8s render`.

Registered in cli/__init__.py (`app.command()(submit)`, `app.add_typer(jobs_app, name="jobs")`, ...);
the helpers it shares with the other commands (`_load`, `_fail`, `err`) are cli/common.py's.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.cli.common import _fail, _load, err
from orchestrator.cluster.jobs import Cluster, ClusterError, find_token
from orchestrator.cluster.submission import ClusterInfo
from orchestrator.serving.deployment import MAX_BATCH
from orchestrator.spec import JobSpec, Problem, SpecError

jobs_app = typer.Typer(help="Jobs on a Ray cluster: list, status, logs, stop.", no_args_is_help=True)
k8s_app = typer.Typer(help="Kubernetes (KubeRay) manifests for jobs.", no_args_is_help=True)

_SET = typer.Option(None, "--set", "-s", help="Override a spec value: dotted.path=value (repeatable).")
_ADDRESS = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                        help="The cluster's Jobs API (dashboard) address, e.g. http://HEAD:8265 [env: RAY_ADDRESS].")
_TOKEN_FILE = typer.Option(None, "--token-file", help="File holding the cluster's Ray auth token (else "
                           "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token for a local cluster).")
_ID = typer.Argument(..., help="The submission id printed by `orchestrator submit`.")


def _cluster(address: Optional[str], token_file: Optional[str]) -> Cluster:
    try:
        token = find_token(address or "", os.environ, token_file)
        return Cluster(address, token)
    except ClusterError as e:
        _cluster_fail(e)


def _cluster_fail(e: ClusterError):
    err.print(f"[bold red]error:[/] {e}", highlight=False)
    raise typer.Exit(code=2)


def _guard(fn: Callable, *args, **kwargs):
    """Call into the cluster; a `ClusterError` is a one-line message and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except ClusterError as e:
        _cluster_fail(e)


# --- submit --------------------------------------------------------------------------------------


def submit(job: Path = typer.Argument(..., help="The job file (YAML)."), set_: Optional[List[str]] = _SET,
           address: Optional[str] = _ADDRESS, token_file: Optional[str] = _TOKEN_FILE,
           wait: bool = typer.Option(False, "--wait", help="Wait for the job to end; exit 0 only if it succeeded."),
           follow: bool = typer.Option(False, "--follow", help="Stream the job's logs until it ends (implies --wait)."),
           requirements: bool = typer.Option(True, "--requirements/--no-requirements",
                                             help="Have Ray pip-install this project's pinned dependencies for "
                                                  "the job; --no-requirements when the cluster's image already "
                                                  "has them (infra/docker)."),
           image: Optional[str] = typer.Option(None, "--image", help="Run the job in this container image "
                                                                      "(Ray's image_uri) instead of pip-installing."),
           allow_local_tracking: bool = typer.Option(False, "--allow-local-tracking",
                                                     help="The cluster runs on this machine: allow a loopback "
                                                          "or local-file tracking URI."),
           force: bool = typer.Option(False, "--force", help="Submit (and run) even if the memory plan says the "
                                                             "job does not fit the cluster's GPUs.")):
    """Validate a job here, plan its memory against the cluster's GPUs, then run it on the cluster
    through the Jobs API; prints the submission id."""
    import orchestrator
    from orchestrator.cluster.submission import (JobPackage, entrypoint, metadata, pinned_requirements, runtime_env,
                                                 submission_id, submission_problems, write_package)

    spec = _load(job, set_)
    cluster = _cluster(address, token_file)
    info = _guard(cluster.info)
    problems = submission_problems(spec, info, allow_local_tracking=allow_local_tracking)
    if problems:
        _fail(SpecError(problems, source=str(job)))
    _plan_on_cluster(spec, info, force, source=str(job))
    with tempfile.TemporaryDirectory(prefix="orchestrator-job-") as tmp:
        write_package(spec, Path(tmp))
        package = JobPackage(
            submission_id=submission_id(spec), entrypoint=entrypoint(force=force), metadata=metadata(spec),
            runtime_env=runtime_env(tmp, code_dir=str(Path(orchestrator.__file__).parent),
                                    requirements=pinned_requirements() if requirements and not image else None,
                                    image=image))
        sid = _guard(cluster.submit, package)
    err.print(f"[dim]•[/] submitted '{spec.name}' to {cluster.address} ({info.nodes} node(s)) as {sid}",
              highlight=False, soft_wrap=True)
    typer.echo(sid)
    if not (wait or follow):
        err.print(f"[dim]•[/] follow it with: orchestrator jobs logs {sid} --follow", highlight=False)
        return
    if follow:
        _guard(cluster.follow, sid, _write_out)
    status = _guard(cluster.wait, sid, on_change=lambda s: err.print(f"[dim]•[/] {sid}: {s}", highlight=False))
    if status != "SUCCEEDED":
        if not follow:  # show why, without a second command
            message = _guard(cluster.details, sid).message or ""
            tail = _guard(cluster.logs, sid).rstrip().splitlines()[-_FAILED_LOG_LINES:]
            err.print("\n".join([f"{sid} {status}: {message}", *tail]), highlight=False, markup=False)
        raise typer.Exit(code=1)


def _plan_on_cluster(spec: JobSpec, info: ClusterInfo, force: bool, source: str) -> None:
    """Plan the job (a search: every trial its space can make) against the cluster's GPUs and say
    so as `run` does; a GPU job that cannot fit exits 2 with the plan, unless `force`. A base whose
    architecture cannot be read here is planned on the cluster only, when the job starts."""
    from orchestrator.cluster.submission import cluster_gpu_budget
    from orchestrator.planning.architectures import architecture_for
    from orchestrator.planning.budget import plan_for_run
    from orchestrator.planning.resources import resources
    from orchestrator.planning.units import human

    try:
        architecture_for(spec)
    except SpecError as e:
        err.print(f"[dim]•[/] Memory plan: not made here ({e.problems[0].message}); the cluster plans the job "
                  f"when it starts", highlight=False, soft_wrap=True)
        return
    res = resources(spec, gpus_available=info.gpus)
    budget, where = cluster_gpu_budget(info)
    problems = []
    try:
        if spec.tune is not None:
            from orchestrator.search.space import misfit_problems, plan_trials

            plans = plan_trials(spec, budget, where)
            plan = max(plans, key=lambda p: p.peak_bytes).plan
            problems = misfit_problems(plans)
            what = f"{len(plans)} trial(s) of the space need up to "
        else:
            plan = plan_for_run(spec, spec.distributed.num_workers, budget, source=where)
            what = ""
    except SpecError as e:
        _fail(SpecError(e.problems, source=source))
    if not res.use_gpu:
        why = "distributed.use_gpu=false" if spec.distributed.use_gpu is False else "the cluster has no GPUs now"
        err.print(f"[dim]•[/] Memory plan: {what}{human(plan.total_bytes)} per GPU; not checked: the job trains on "
                  f"CPUs ({why})", highlight=False, soft_wrap=True)
        return
    err.print(f"[dim]•[/] Memory plan: {what}{human(plan.total_bytes)} of {human(budget)} per GPU ({where})",
              highlight=False, soft_wrap=True)
    if force and (problems or not plan.fits):
        err.print("[yellow]warning:[/] the plan says the job does not fit; submitting it anyway (--force)",
                  highlight=False)
    elif problems:
        _fail(SpecError(problems, source=source))
    elif not plan.fits:
        from orchestrator.cli.plan import _print_plan  # imported here: plan registers its command last

        _print_plan(spec, plan, explain=False)
        err.print("[bold red]error:[/] refusing to submit a job that cannot fit the cluster's GPUs (see the plan "
                  "and the changes above); pass --force to submit it anyway", highlight=False)
        raise typer.Exit(code=2)


# On failure, `submit --wait` shows the end of the job's log (the traceback, or the problems found).
_FAILED_LOG_LINES = 30


def _write_out(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


# --- jobs ----------------------------------------------------------------------------------------


def _when(ms: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _duration(job) -> str:
    if not job.start_time:
        return "-"
    end = job.end_time or time.time() * 1000
    return f"{(end - job.start_time) / 1000:.0f} s"


def _job_json(job) -> dict:
    return {"submission_id": job.submission_id, "job_id": job.job_id, "status": str(job.status.value),
            "message": job.message, "start_time": job.start_time, "end_time": job.end_time,
            "entrypoint": job.entrypoint, "metadata": job.metadata or {}, "runtime_env": job.runtime_env or {}}


@jobs_app.command("list")
def list_jobs(address: Optional[str] = _ADDRESS, token_file: Optional[str] = _TOKEN_FILE,
              all_jobs: bool = typer.Option(False, "--all", help="Include jobs not submitted by orchestrator."),
              as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")):
    """The cluster's jobs, newest first."""
    cluster = _cluster(address, token_file)
    jobs = [j for j in _guard(cluster.jobs)
            if j.submission_id and (all_jobs or "orchestrator.job" in (j.metadata or {}))]
    if as_json:
        typer.echo(json.dumps([_job_json(j) for j in jobs], indent=2))
        return
    table = Table(title=f"Jobs on {cluster.address}", title_justify="left")
    for col in ("submission id", "status", "job", "user", "started", "duration"):
        table.add_column(col, no_wrap=col in ("submission id", "status", "started"))
    for j in jobs:
        meta = j.metadata or {}
        started = time.strftime("%m-%d %H:%M", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        table.add_row(j.submission_id, _styled(str(j.status.value)), meta.get("orchestrator.job", "-"),
                      meta.get("orchestrator.user", "-"), started, _duration(j))
    Console().print(table)


def _styled(status: str) -> str:
    color = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow", "RUNNING": "cyan"}.get(status)
    return f"[{color}]{status}[/]" if color else status


@jobs_app.command("status")
def job_status(submission_id: str = _ID, address: Optional[str] = _ADDRESS, token_file: Optional[str] = _TOKEN_FILE,
               as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """One job: status, message, who submitted which spec, when, and where its workers ran."""
    cluster = _cluster(address, token_file)
    job = _guard(cluster.details, submission_id)
    workers = _guard(cluster.workers, submission_id)
    if as_json:
        typer.echo(json.dumps({**_job_json(job), "workers": [asdict(w) for w in workers]}, indent=2))
        return
    meta = job.metadata or {}
    table = Table(title=f"Job {submission_id}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", _styled(str(job.status.value)))
    table.add_row("message", job.message or "-")
    for key in ("job", "spec_hash", "user", "experiment", "tracking_uri"):
        table.add_row(key.replace("_", " "), meta.get(f"orchestrator.{key}", "-"))
    table.add_row("started", _when(job.start_time))
    table.add_row("ended", _when(job.end_time))
    table.add_row("duration", _duration(job))
    alive = sum(w.state == "ALIVE" for w in workers)
    table.add_row("workers", f"{len(workers)} on {len({w.node_id for w in workers})} node(s), {alive} alive"
                  if workers else "-")
    table.add_row("entrypoint", job.entrypoint)
    Console().print(table)


@jobs_app.command("logs")
def job_logs(submission_id: str = _ID, address: Optional[str] = _ADDRESS, token_file: Optional[str] = _TOKEN_FILE,
             follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends.")):
    """The job's driver output (what `orchestrator run` printed on the cluster)."""
    cluster = _cluster(address, token_file)
    if follow:
        _guard(cluster.follow, submission_id, _write_out)
    else:
        _write_out(_guard(cluster.logs, submission_id))


@jobs_app.command("stop")
def job_stop(submission_id: str = _ID, address: Optional[str] = _ADDRESS, token_file: Optional[str] = _TOKEN_FILE,
             wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the job has stopped."),
             timeout: float = typer.Option(60.0, help="Seconds to wait.")):
    """Stop a running job (its driver, workers and their GPUs are released)."""
    cluster = _cluster(address, token_file)
    if not _guard(cluster.stop, submission_id):
        err.print(f"{submission_id} had already ended: {_guard(cluster.status, submission_id)}", highlight=False)
        return
    err.print(f"[dim]•[/] stop requested for {submission_id}", highlight=False)
    if wait:
        status = _guard(cluster.wait, submission_id, timeout_s=timeout)
        err.print(f"{submission_id}: {status}", highlight=False)
        if status not in ("STOPPED", "FAILED", "SUCCEEDED"):
            raise typer.Exit(code=1)


# --- k8s -----------------------------------------------------------------------------------------


@k8s_app.command("render")
def k8s_render(job: Optional[Path] = typer.Argument(None, help="The job file (YAML); with --serve, optional."),
               set_: Optional[List[str]] = _SET,
               output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write here (default: stdout)."),
               image: str = typer.Option("orchestrator:0.1.0", help="Image built from infra/docker/Dockerfile."),
               namespace: str = typer.Option("default"),
               storage_claim: str = typer.Option("cluster-storage", help="Shared PVC mounted at /mnt/cluster_storage."),
               worker_memory: str = typer.Option("32Gi", help="Memory per worker (or replica) pod."),
               ttl: int = typer.Option(600, help="Seconds to keep the finished cluster (for its logs)."),
               serve: Optional[List[str]] = typer.Option(None, "--serve", help="Render a RayService serving this "
                                                         "registered version (models:/NAME@ALIAS; repeatable: "
                                                         "adapters of one base) instead of a RayJob."),
               tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="With --serve: the MLflow "
                                                          "server the replicas read the registry from (default: "
                                                          "the job's tracking.uri)."),
               replicas: int = typer.Option(1, "--replicas", min=1, help="With --serve: replicas, one pod each."),
               cpus_per_replica: int = typer.Option(2, "--cpus-per-replica", min=1, help="With --serve."),
               gpu: bool = typer.Option(False, "--gpu", help="With --serve: one GPU per replica."),
               reload_every: float = typer.Option(60.0, "--reload-every", min=1.0, help="With --serve: seconds "
                                                  "between the replicas' alias re-resolutions."),
               max_batch: int = typer.Option(MAX_BATCH, "--max-batch", min=1, help="With --serve: requests a "
                                             "replica completes together at most (1: each alone).")):
    """Write a KubeRay RayJob (and a ConfigMap with the job and its data) for `kubectl apply -f`;
    with --serve, a RayService running `orchestrator serve` for registered versions."""
    from orchestrator.cluster.kuberay import (K8sOptions, ServeOptions, manifests, render_problems, serve_problems,
                                              service_manifest, to_yaml)

    opts = K8sOptions(image=image, namespace=namespace, storage_claim=storage_claim, worker_memory=worker_memory,
                      ttl_seconds=ttl)
    if serve:
        spec = _load(job, set_) if job is not None else None
        uri = tracking_uri or (spec.tracking.uri if spec else None)
        if uri is None:
            _fail(SpecError([Problem(path="--tracking-uri", message="no registry to serve from",
                                     fix="pass --tracking-uri http://MLFLOW:5000 (or a job file whose tracking.uri "
                                         "names the server)")]))
        options = ServeOptions(models=tuple(serve), tracking_uri=uri, replicas=replicas,
                               cpus_per_replica=cpus_per_replica, gpu=gpu, reload_every=reload_every,
                               max_batch=max_batch,
                               **({"name": f"{spec.name}-serve"} if spec else {}))
        problems = serve_problems(options)
        if problems:
            _fail(SpecError(problems))
        docs = [service_manifest(options, opts)]
    else:
        if job is None:
            _fail(SpecError([Problem(path="JOB", message="no job file",
                                     fix="pass a job file (a RayJob), or --serve models:/NAME@ALIAS (a RayService)")]))
        spec = _load(job, set_)
        problems = render_problems(spec)
        if problems:
            _fail(SpecError(problems, source=str(job)))
        docs = manifests(spec, opts)
    text = to_yaml(docs)
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    err.print(f"[green]wrote[/] {output}: kubectl apply -f {output}", highlight=False)
