"""MLflow runs: open one (params, tags, artifacts), log to it, find, reopen and finish runs.

The driver opens the run (`start_run`), rank 0 of the workers streams per-step metrics into it
(`tracking.metrics.MetricLogger`), and the driver closes it and registers the result
(`tracking.registry`). MLflow is imported only inside the functions that call it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.spec import SPEC_FILE, JobSpec, flatten

ADAPTER_ARTIFACT = "adapter"


def resolve_tracking_uri(uri: str, cwd: Path | None = None) -> str:
    """Make a relative sqlite URI absolute, so workers (whose working directory differs) and a
    later `mlflow ui` find the same database file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = (cwd or Path.cwd()) / uri[len(prefix):]
        return prefix + str(path.resolve())
    return uri


def _artifact_root(uri: str) -> str | None:
    """For a sqlite store, keep artifacts in `mlartifacts/` beside the database file."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None


@contextlib.contextmanager
def _quiet():
    """Silence MLflow's console chatter (progress bars, notices) around a call; errors still raise."""
    import logging
    import warnings

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# No tqdm bars for artifact transfers in our console output, nor MLflow's "View run ... at: URL"
# notice when a run ends (its URL is `tracking.uri` as given, user:password@ included).
CLIENT_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def _client(uri: str):
    import mlflow
    from mlflow import MlflowClient

    for k, v in CLIENT_ENV.items():
        os.environ.setdefault(k, v)
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating tables..."
    # MLflow keeps these URIs in the environment: set only when they change, so a process changes
    # its environment once, not at every call (a training worker's sends run beside torch's,
    # gloo's and Ray's threads, and setenv beside their getenv is a data race in glibc).
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    if mlflow.get_registry_uri() != uri:
        mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri}"


@dataclass
class RunHandle:
    uri: str
    run_id: str
    experiment: str
    experiment_id: str


def _experiment_id(client, uri: str, name: str) -> str:
    """The id of the experiment `name`, created (artifacts beside a sqlite store) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = _artifact_root(uri)
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def start_run(spec: JobSpec, *, tags: dict[str, str], artifacts: dict[str, Any], parent_run_id: str | None = None,
              run_name: str | None = None) -> RunHandle:
    """Create the run: flattened spec as params, tags, and text/JSON artifacts; with
    `parent_run_id`, a child run nested under that one (a trial under its search)."""
    from mlflow.entities import Param, RunTag

    uri = resolve_tracking_uri(spec.tracking.uri)
    client = _client(uri)
    name = spec.experiment
    exp_id = _experiment_id(client, uri, name)
    run = client.create_run(exp_id, run_name=run_name or spec.name, tags={
        "spec_hash": spec.spec_hash(), "base_model": spec.model.base, **parent_tags(parent_run_id), **tags})
    run_id = run.info.run_id
    params = [Param(k, str(v)[:6000]) for k, v in flatten(spec.public_dict()).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    handle = RunHandle(uri=uri, run_id=run_id, experiment=name, experiment_id=exp_id)
    log_artifacts(handle, {SPEC_FILE: spec.to_yaml(), **artifacts})
    return handle


def open_store(uri: str) -> None:
    """Import MLflow and open the tracking store once (for a new sqlite file this creates its
    tables, about 2 s), so that later calls find it ready. Never raises: the first real call
    reports any problem with the store."""
    with contextlib.suppress(Exception):
        _client(resolve_tracking_uri(uri)).search_experiments(max_results=1)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise `SpecError` (tracking.uri) when an MLflow server URI does not answer within
    `timeout_s`, so that a typo or a stopped server costs seconds, before any worker starts.
    Database and file stores are opened by MLflow itself."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    from orchestrator.spec import Problem, SpecError

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    # /health answers without credentials; the URI's own path prefix is kept (a proxied server).
    url = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path.rstrip('/')}/health"
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy may not know /health): reachable
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise SpecError([Problem(path="tracking.uri",
                                 message=f"cannot reach the MLflow server at {url.removesuffix('/health')} "
                                         f"({reason})",
                                 fix="start it (e.g. infra/mlflow, or `mlflow server --host 127.0.0.1 --port "
                                     "5000`), fix the address, or use sqlite:///mlflow.db")]) from None


def wait_for_server(uri: str, timeout_s: float, interval_s: float = 2.0) -> bool:
    """True once the tracking server answers (at once for database and file stores); False
    when it has not within `timeout_s`."""
    from orchestrator.spec import SpecError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check_reachable(uri)
            return True
        except SpecError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval_s)


# Runs a second `orchestrator run` of the same job picks up again: stopped before they finished.
RESUMABLE_STATUSES = ("RUNNING", "FAILED", "KILLED")


def resumable_run(spec: JobSpec) -> RunHandle | None:
    """The job's latest MLflow run (same name, same spec hash) when it stopped unfinished, else
    None: a finished latest run means the job is done and a new run starts."""
    uri = resolve_tracking_uri(spec.tracking.uri)
    client = _client(uri)
    experiment = client.get_experiment_by_name(spec.experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"attributes.run_name = '{spec.name}' and "
                                            f"tags.spec_hash = '{spec.spec_hash()}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or runs[0].info.status not in RESUMABLE_STATUSES:
        return None
    return RunHandle(uri=uri, run_id=runs[0].info.run_id, experiment=spec.experiment,
                     experiment_id=experiment.experiment_id)


def stopped_run_spec(uri: str, name: str) -> tuple[str, JobSpec]:
    """The run id and job spec of the latest run named `name` that stopped unfinished, for
    `orchestrator resume`. Raises LookupError when there is none."""
    from orchestrator.spec import parse_spec

    import yaml

    client = _client(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or runs[0].info.status not in RESUMABLE_STATUSES:
        state = f"its latest run {runs[0].info.run_id} is {runs[0].info.status}" if runs else "there is no run"
        raise LookupError(f"no stopped run of job '{name}' in {uri} to resume ({state})")
    run_id = runs[0].info.run_id
    text = Path(client.download_artifacts(run_id, SPEC_FILE)).read_text(encoding="utf-8")
    return run_id, parse_spec(yaml.safe_load(text), source=f"{SPEC_FILE} of run {run_id}")


def reopen_run(handle: RunHandle) -> None:
    """Mark a stopped run as running again (it is being resumed)."""
    _client(handle.uri).update_run(handle.run_id, status="RUNNING")


def start_parent_run(spec: JobSpec, *, name: str, tags: dict[str, str]) -> RunHandle:
    """A run that holds other runs (`orchestrator compare`: one child per method); it carries the
    shared job spec as an artifact, and the children carry their own params."""
    uri = resolve_tracking_uri(spec.tracking.uri)
    client = _client(uri)
    exp_id = _experiment_id(client, uri, spec.experiment)
    run = client.create_run(exp_id, run_name=name, tags={"base_model": spec.model.base, **tags})
    client.log_text(run.info.run_id, spec.to_yaml(), SPEC_FILE)
    return RunHandle(uri=uri, run_id=run.info.run_id, experiment=spec.experiment, experiment_id=exp_id)


def log_files(handle: RunHandle, paths: list[Path]) -> None:
    """Upload local files as artifacts at the root of the run."""
    client = _client(handle.uri)
    for path in paths:
        client.log_artifact(handle.run_id, str(path))


def parent_tags(parent_run_id: str | None) -> dict[str, str]:
    """The tag that nests a run under another in the MLflow UI (none for a top-level run)."""
    return {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}


def log_metrics(handle: RunHandle, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client(handle.uri).log_batch(handle.run_id, metrics=[
        Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None])


def set_tags(handle: RunHandle, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    _client(handle.uri).log_batch(handle.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def finish_run(handle: RunHandle, status: str = "FINISHED") -> None:
    _client(handle.uri).set_terminated(handle.run_id, status=status)


def log_params(handle: RunHandle, params: dict[str, Any]) -> None:
    """Params not logged yet (MLflow refuses to change a logged param)."""
    from mlflow.entities import Param

    logged = _client(handle.uri).get_run(handle.run_id).data.params
    new = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()
           if k not in logged]
    if new:
        _client(handle.uri).log_batch(handle.run_id, params=new)


def log_artifacts(handle: RunHandle, artifacts: dict[str, Any]) -> None:
    """Text, JSON (dicts and lists) and matplotlib figures (logged as PNG) under their paths."""
    client = _client(handle.uri)
    for path, content in artifacts.items():
        if hasattr(content, "savefig"):
            with _quiet():
                client.log_figure(handle.run_id, content, path)
        elif isinstance(content, (dict, list)):
            client.log_dict(handle.run_id, content, path)
        else:
            client.log_text(handle.run_id, str(content), path)


def find_runs(uri: str, experiment: str, tags: dict[str, str]) -> list[tuple[RunHandle, str, dict]]:
    """Runs of `experiment` carrying all of `tags`, newest first: (handle, status, tags)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=1000)
    return [(RunHandle(uri=uri, run_id=r.info.run_id, experiment=experiment, experiment_id=exp.experiment_id),
             r.info.status, dict(r.data.tags)) for r in runs]


def find_runs_anywhere(uri: str, tags: dict[str, str]) -> list[tuple[RunHandle, str, dict]]:
    """Runs of any experiment carrying all of `tags`, newest first."""
    client = _client(uri)
    out = []
    for exp in client.search_experiments():
        out += find_runs(uri, exp.name, tags)
    return sorted(out, key=lambda r: client.get_run(r[0].run_id).info.start_time, reverse=True)


def read_run_text(handle: RunHandle, path: str) -> str:
    return Path(_client(handle.uri).download_artifacts(handle.run_id, path)).read_text(encoding="utf-8")


def lineage_tags(lineage: dict) -> dict[str, str]:
    """Lineage as flat run/version tags (`data.train_sha256`, ...); unknown values left out."""
    return {k: str(v) for k, v in flatten(lineage).items() if v is not None}


def run_handle(uri: str, run_id: str) -> RunHandle:
    run = _client(uri).get_run(run_id)
    experiment = _client(uri).get_experiment(run.info.experiment_id)
    return RunHandle(uri=uri, run_id=run_id, experiment=experiment.name, experiment_id=experiment.experiment_id)


def run_metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric of a run, by step."""
    client = _client(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
